"""Fixtures for the image-text data tests: tiny real processors (built offline by
automodel_cli.components.data.tiny_processor), images made with Pillow, data-file writers.
Imported explicitly by the test modules, like data_fixtures.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def load_processor(directory: Path):
    """``AutoProcessor.from_pretrained(directory)``. Where torchvision is missing, transformers
    cannot build processor classes that declare a video processor (Qwen2-VL's: its check of the
    missing video processor fails); the processor is then assembled from the same saved parts
    with that one check skipped, which changes nothing about text or image processing."""
    from transformers import AutoProcessor

    if importlib.util.find_spec("torchvision") is not None:
        return AutoProcessor.from_pretrained(directory)
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin
    from transformers.models.auto.processing_auto import processor_class_from_name

    settings = json.loads((directory / "processor_config.json").read_text())
    cls = processor_class_from_name(settings["processor_class"])
    if "video_processor" not in cls.get_attributes():
        return AutoProcessor.from_pretrained(directory)
    check = ProcessorMixin.check_argument_for_proper_class

    def check_present(self, name, argument):
        return None if name == "video_processor" and argument is None else check(self, name, argument)

    extra = {k: v for k, v in settings.items() if k not in ("image_processor", "processor_class")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ProcessorMixin, "check_argument_for_proper_class", check_present)
        return cls(image_processor=AutoImageProcessor.from_pretrained(directory),
                   tokenizer=AutoTokenizer.from_pretrained(directory), video_processor=None,
                   chat_template=(directory / "chat_template.jinja").read_text(), **extra)


@pytest.fixture(scope="session")
def qwen2_vl_processor(tmp_path_factory):
    from automodel_cli.components.data.tiny_processor import build_qwen2_vl_processor

    return load_processor(build_qwen2_vl_processor(tmp_path_factory.mktemp("qwen2_vl_processor")))


@pytest.fixture(scope="session")
def gemma3_processor(tmp_path_factory):
    from automodel_cli.components.data.tiny_processor import build_gemma3_processor

    return load_processor(build_gemma3_processor(tmp_path_factory.mktemp("gemma3_processor")))


@pytest.fixture(params=["qwen2_vl", "gemma3"])
def vlm_processor(request):
    """Each tiny processor in turn."""
    return request.getfixturevalue(f"{request.param}_processor")


def save_image(path: Path, size=(40, 30), colour=(255, 0, 0)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path
