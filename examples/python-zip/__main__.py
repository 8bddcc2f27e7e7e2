"""A zipped Python action: __main__.py imports its sibling modules.

Parameter: ``text``, the words to count.
    python3 owproxy.py invoke examples/python-zip -p text "the quick brown fox"
"""
import words


def main(args):
    text = args.get("text", "")
    return {"words": words.count(text), "longest": words.longest(text)}
