/* A compiled action: the parameters arrive as JSON in argv[1] (and on stdin);
   the last line on stdout is the result. */
#include <stdio.h>

int main(int argc, char **argv) {
    fprintf(stderr, "a log line from C\n");
    printf("{\"language\": \"C\", \"params\": %s}\n", argc > 1 ? argv[1] : "{}");
    return 0;
}
