"""Gradio app entry point (UI only). The full app lands with the app issue; until then it explains what is missing."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="I-JEPA, visible: draw a box, see what the predictor expects.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.parse_args(argv)
    print("The app is not built yet: it needs the decoder (decoder/) and the default model in assets/. "
          "Track progress in the project's issues; `python -m pytest` runs what exists.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
