# An OpenWhisk action image from any base that has python3: here Ubuntu 24.04.
#   docker build -t my-action .
#   docker run -p 8080:8080 my-action
# Replace /action/exec (COPY your executable over it) or POST /init with code.
FROM ubuntu:24.04

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

COPY owproxy.py /owproxy.py

# A stub action that says what to replace it with.
RUN mkdir -p /action && printf '%s\n' '#!/bin/sh' 'echo "This is a stub action. Replace /action/exec with your executable (COPY it into the image), or POST /init with code."' 'echo "It gets its parameters as JSON in \$1 (up to 131071 characters) and always on stdin; its last line of output is its JSON result."' 'echo "{\"error\": \"This is a stub action. Replace it with custom logic.\"}"' > /action/exec && chmod 755 /action/exec

EXPOSE 8080
# Liveness: /healthz (readiness, for orchestrators: /readyz).
HEALTHCHECK --interval=30s --timeout=3s CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FLASK_PROXY_PORT', '8080'), timeout=2)"
CMD ["python3", "/owproxy.py"]
