"""A Python function action: owproxy imports it once and calls main() per activation."""
import os

greeted = []


def main(args):
    name = args.get("name", "stranger")
    greeted.append(name)
    print("greeting", name, "in activation", os.environ.get("__OW_ACTIVATION_ID"))
    return {"greeting": "Hello, %s!" % name, "greeted_so_far": len(greeted)}
