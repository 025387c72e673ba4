"""Registration of the prompt_peft methods with peft: a real PeftType member, idempotent, reload-safe."""

import copy
import importlib
import json
import pickle
import subprocess
import sys

import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import prompt_peft
from prompt_peft.registry import add_peft_type, register_method


def test_vpt_is_a_real_peft_type():
    member = PeftType.VPT
    assert member is PeftType["VPT"] is PeftType("VPT")
    assert member in list(PeftType) and member.value == "VPT" and member == "VPT"
    assert hash(member) == hash("VPT")
    assert json.dumps({"t": member}) == '{"t": "VPT"}'
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    assert PeftType.LORA in list(PeftType)  # built-in members untouched


def test_mappings_point_at_our_classes():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VPT] is prompt_peft.VPTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.VPT] is prompt_peft.VPTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.VPT] == "vpt_"


def test_registration_is_idempotent():
    before = len(list(PeftType))
    assert add_peft_type("VPT") is PeftType.VPT
    assert register_method("vpt", prompt_peft.VPTConfig, prompt_peft.VPTModel) is PeftType.VPT
    importlib.reload(prompt_peft)  # re-executes the package's registration call
    assert len(list(PeftType)) == before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VPT] is prompt_peft.VPTConfig


def test_reloaded_classes_replace_their_stale_twins():
    # importlib.reload of the defining module creates new class objects with the same qualified name.
    original = prompt_peft.VPTConfig
    twin = type("VPTConfig", (original,), {"__module__": original.__module__, "__qualname__": original.__qualname__})
    try:
        register_method("vpt", twin, prompt_peft.VPTModel)
        assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VPT] is twin
    finally:
        register_method("vpt", original, prompt_peft.VPTModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.VPT] is original


def test_another_class_cannot_take_over_a_registered_type():
    class VPTConfig:  # same name, different module: must not silently replace ours
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("vpt", VPTConfig, prompt_peft.VPTModel)


def test_config_round_trips_through_peft_config(tmp_path):
    from peft import PeftConfig

    prompt_peft.VPTConfig(num_prompts=3, deep=False, num_classes=7).save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is prompt_peft.VPTConfig
    assert (loaded.num_prompts, loaded.deep, loaded.num_classes, loaded.peft_type) == (3, False, 7, PeftType.VPT)


def test_without_the_import_peft_does_not_know_the_method(tmp_path):
    """What the README explains: peft has no plugin discovery, so `import prompt_peft` must come first."""
    prompt_peft.VPTConfig(num_prompts=2).save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from peft import PeftConfig\n"
        "try:\n"
        f"    PeftConfig.from_pretrained({str(tmp_path)!r})\n"
        "except KeyError as e:\n"
        "    print('KeyError', e)\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "KeyError 'VPT'" in result.stdout
