"""The argparse parser a command builds, caught as it parses: what the CLI and docs tests read."""
import argparse
import importlib


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser that `python -m command` builds, caught as it parses (some build it in main)."""
    module = importlib.import_module(command + ".__main__" if command in ("m2dino.export", "m2dino.data.synthetic")
                                     else command)
    original = argparse.ArgumentParser.parse_args

    def catch(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = catch
    try:
        module.main([])
    except _Parsed as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{command} did not parse")
