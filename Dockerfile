# An OpenWhisk action image from any base that has python3: here Ubuntu 24.04.
#   docker build -t my-action .
#   docker run -p 8080:8080 my-action
# Replace /action/exec (COPY your executable over it) or POST /init with code.
FROM ubuntu:24.04
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*

# Compiled at build time: a start from /owproxy.pyc skips compiling the script,
# a third of a cold start.
COPY owproxy.py /owproxy.py
RUN python3 -m compileall -b -q /owproxy.py

# A stub action that says what to replace it with.
RUN mkdir -p /action && printf '%s\n' '#!/bin/sh' 'echo "This is a stub action. Replace /action/exec with your executable (COPY it into the image), or POST /init with code."' 'echo "It gets its parameters as JSON in \$1 (up to 131071 characters) and always on stdin; its last line of output is its JSON result."' 'echo "{\"error\": \"This is a stub action. Replace it with custom logic.\"}"' > /action/exec && chmod 755 /action/exec

EXPOSE 8080
# Liveness: /healthz on the port the proxy listens on, however it was set (a
# --port in CMD, FLASK_PROXY_PORT, PORT: read from PID 1), over IPv6 or IPv4
# loopback, whichever it listens on; a failure is one line in the health log.
HEALTHCHECK --interval=30s --timeout=3s CMD python3 -S /owproxy.pyc healthcheck
# -S: the proxy needs nothing from site-packages, and skipping site is a tenth of a start
# (a Python function's worker still gets them).
CMD ["python3", "-S", "/owproxy.pyc"]
