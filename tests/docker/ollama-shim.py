#!/usr/bin/env python3
"""`ollama list` for the fake Ollama image: what the compose healthcheck runs."""

import json
import sys
import urllib.request

if sys.argv[1:] != ["list"]:
    sys.exit(f"fake ollama: only `ollama list` exists here, not {sys.argv[1:]}")
with urllib.request.urlopen("http://127.0.0.1:11434/api/tags", timeout=5) as resp:  # noqa: S310
    for model in json.load(resp)["models"]:
        print(model["name"])
