"""Entry point of the minimal example backend: the capsule holding its C table."""

from pathlib import Path

from ferrum_moe.plugin import capsule_from_library


def backend_api():
    return capsule_from_library(Path(__file__).with_name("libferrum_moe_minimal.so"))
