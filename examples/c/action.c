/* A compiled action: the parameters arrive as JSON in argv[1] (and on stdin);
   the last line on stdout is the result.
   `python3 owproxy.py invoke examples/c` compiles it with cc and runs it;
   an image compiles it in a build stage (see Dockerfile). */
#include <stdio.h>

int main(int argc, char **argv) {
    fprintf(stderr, "a log line from C\n");
    printf("{\"language\": \"C\", \"params\": %s}\n", argc > 1 ? argv[1] : "{}");
    return 0;
}
