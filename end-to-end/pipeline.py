"""The main job: prepare, tune, evaluate and chat on the default model, one stage after another.

Placeholder until the stage scripts land (issue 9 completes it)."""
import argparse

if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    raise SystemExit("the pipeline is not assembled yet: see the README for the stages that exist")
