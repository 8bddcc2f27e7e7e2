#!/bin/bash
# A bash action: the parameters arrive as JSON in $1 (and on stdin); every line
# it prints is a log line, except the last, which is its JSON result.
name=$(echo "$1" | sed -n 's/.*"name" *: *"\([^"]*\)".*/\1/p')
echo "greeting ${name:-stranger} for activation $__OW_ACTIVATION_ID"
echo "this line goes to stderr" >&2
echo "{\"greeting\": \"Hello, ${name:-stranger}!\"}"
