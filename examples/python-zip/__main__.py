"""A zipped Python action: __main__.py imports its sibling modules."""
import words


def main(args):
    text = args.get("text", "")
    return {"words": words.count(text), "longest": words.longest(text)}
