"""Bad input is never silent (issue 13): a table of bad settings, data, output folders and Hub conditions, each
with the message it must produce, before any model loads or any step is trained.

Together with the damaged-adapter table of tests/test_strict_loading.py (32 rows) this covers every class of
issue 13 except non-native image sizes. Rows marked "was: ..." record what the same input did before.
"""

import io
import re
import shutil
import socket
import time

import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from hub_server import patch_hf_hub
from PIL import Image
from test_train_dml import args, load_script

from prompt_peft.config_checks import ConfigError, check_value
from prompt_peft.data import BadImagesError, load_hub_dataset
from prompt_peft.data.safe_paths import UnsafeImagePathError
from prompt_peft.hub_checks import HubUnreachableError
from prompt_peft.training.output_dir import OutputDirExistsError


@pytest.fixture(scope="module")
def script():
    return load_script()


class Context:
    """What a row needs: the shared workspace, a fresh tmp folder, monkeypatch (for the Hub)."""

    def __init__(self, script, workspace, tmp_path, monkeypatch):
        self.script, self.workspace, self.tmp, self.monkeypatch = script, workspace, tmp_path, monkeypatch

    def argv(self, *extra, output="out"):
        return args(self.workspace, self.tmp / output, *extra)

    def parse(self, *extra):
        return self.script.parse_args(self.argv(*extra))

    def yaml(self, text):
        config = self.tmp / "run.yaml"
        config.write_text(text)
        return self.script.parse_args(["--config", str(config)])

    def main(self, *extra, output="out"):
        return self.script.main(self.argv(*extra, output=output))

    def dead_hub(self):
        """huggingface_hub pointed at a loopback port nobody listens on: every request is refused at once."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        patch_hf_hub(self.monkeypatch, f"http://127.0.0.1:{port}", self.tmp / "hf_home")

    def images(self, damage):
        """A copy of the workspace's image folder with one damaged file."""
        root = self.tmp / "images"
        shutil.copytree(self.workspace / "images", root)
        damage(root / "class_0")
        return ["--data_root", str(root)]

    def parquet(self, image_paths):
        """A parquet data set whose first rows hold only these image paths (the rest hold bytes)."""
        folder = self.tmp / "parquet_data"
        folder.mkdir(exist_ok=True)
        png = io.BytesIO()
        Image.new("RGB", (20, 20), (5, 5, 5)).save(png, "PNG")
        rows = [{"path": path, "bytes": None} for path in image_paths]
        rows += [{"path": None, "bytes": png.getvalue()} for _ in range(8 - len(rows))]
        features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c", "d"])})
        table = Dataset.from_dict({"image": rows, "label": [i % 4 for i in range(8)]}, features=features).data.table
        pq.write_table(table, folder / "train.parquet")  # as written by someone else: paths not embedded
        return load_hub_dataset(str(folder / "train.parquet"), test_ratio=0.5, progress=False)


def _truncate(folder):
    path = next(folder.glob("*.jpg"))
    path.write_bytes(path.read_bytes()[:300])


def _empty(folder):
    (folder / "empty.jpg").write_bytes(b"")


def _not_an_image(folder):
    (folder / "notes.jpg").write_text("this is not a JPEG")


def _tiny(folder):
    Image.new("RGB", (2, 2)).save(folder / "tiny.png")


def _occupied_output(ctx):
    (ctx.tmp / "out" / "adapter").mkdir(parents=True)
    (ctx.tmp / "out" / "adapter" / "adapter_config.json").write_text("{}")
    return ctx.main("--max_steps", "1")


def _output_is_a_file(ctx):
    (ctx.tmp / "out").write_text("")
    return ctx.main()


def _backbone_without_config(ctx):
    (ctx.tmp / "empty_model").mkdir()
    return ctx.main("--backbone", str(ctx.tmp / "empty_model"))


def _hub_backbone_offline(ctx):
    ctx.dead_hub()
    return ctx.main("--backbone", "facebook/dinov2-small")


def _push_offline(ctx):
    ctx.dead_hub()
    return ctx.main("--push_to_hub", "true", "--hub_model_id", "me/run", "--base_model_hub_id", "org/tiny-vit")


def _parquet_symlink_out(ctx):
    (ctx.tmp / "parquet_data").mkdir()
    (ctx.tmp / "parquet_data" / "link.png").symlink_to("/etc/hostname")  # inside the folder, pointing out
    return ctx.parquet(["link.png"])


def _offline_mode_not_cached(ctx):
    patch_hf_hub(ctx.monkeypatch, None, ctx.tmp / "hf_home", offline=True)
    return ctx.main("--backbone", "facebook/dinov2-small")


def _peft_push_offline(ctx):
    from peft import get_peft_model
    from tiny_models import tiny_model

    from prompt_peft import VPTConfig

    ctx.dead_hub()
    return get_peft_model(tiny_model("ViTModel"), VPTConfig(num_prompts=1)).push_to_hub("me/adapter")


def _push_adapter_offline(ctx):
    from peft import get_peft_model
    from tiny_models import tiny_model

    from prompt_peft import VPTConfig
    from prompt_peft.hub import push_adapter_to_hub

    ctx.dead_hub()
    model = get_peft_model(tiny_model("ViTModel"), VPTConfig(num_prompts=1))
    return push_adapter_to_hub(model, "me/adapter", base_model_id="org/tiny-vit")


# YAML files (point 6) -- was: TypeError / numpy cast error / AttributeError deep in the run
YAML_CASES = [
    ("yaml_list_for_float", "learning_rate: [0.1]", r"learning_rate must be a number, got \[0\.1\] \(list\)"),
    ("yaml_float_seed", "seed: 1.7", r"seed must be an integer, got 1\.7"),
    ("yaml_top_level_list", "- seed: 1\n- lr: 2", r"top level must be a mapping of settings.*got a list"),
    ("yaml_top_level_scalar", "42", r"top level must be a mapping.*got an integer"),
    (
        "yaml_absurd_num_prompts",
        "method_kwargs:\n  num_prompts: 100000000",
        r"num_prompts=100000000 is far beyond any sensible value \(at most 4096\)",
    ),
    ("yaml_string_int", "batch_size: '32'", r"batch_size must be an integer, got '32' \(str\)"),
    ("yaml_float_epochs", "num_epochs: 1.5", r"num_epochs must be an integer"),
    ("yaml_string_bool", "check_counts: 'yes'", r"check_counts must be true or false, got 'yes'"),
    ("yaml_bool_for_int", "max_steps: true", r"max_steps must be an integer"),
    ("yaml_number_for_path", "output_dir: 5", r"output_dir must be a string"),
    ("yaml_list_for_method_kwargs", "method_kwargs: [1, 2]", r"method_kwargs must be a string, got \[1, 2\]"),
    ("yaml_syntax_error", "learning_rate: [0.1", r"not valid YAML \(line 2\)"),
    ("yaml_unknown_key", "not_an_option: 1", r"unknown keys \['not_an_option'\]"),
    ("yaml_absurd_image_size", "image_size: 100000", r"image_size=100000 is far beyond"),
    ("yaml_bad_method_option_type", "method_kwargs: {deep: 'no'}", r"deep must be true or false, got 'no'"),
    ("yaml_unknown_method_option", "method_kwargs: {bogus: 1}", r"\['bogus'\] are not options of vpt \(VPTConfig\)"),
]
# command-line values (point 6) -- was: bare JSONDecodeError / TypeError / out of memory
CLI_CASES = [
    ("cli_invalid_json", ["--method_kwargs", "{num_prompts: 2"], r"--method_kwargs is not valid JSON"),
    ("cli_json_not_object", ["--method_kwargs", "[1, 2]"], r"--method_kwargs must be a JSON object of vpt options"),
    ("cli_float_num_prompts", ["--method_kwargs", '{"num_prompts": 2.5}'], r"num_prompts must be an integer, got 2\.5"),
    ("cli_absurd_num_prompts", ["--method_kwargs", '{"num_prompts": 100000000}'], r"num_prompts=100000000 is far"),
    (
        "cli_negative_num_prompts",
        ["--method_kwargs", '{"num_prompts": -1}'],
        r"--method vpt settings: num_prompts must be a non-negative integer",
    ),
    ("cli_repeated_prompt_layer", ["--method_kwargs", '{"prompt_layers": [0, 0]}'], r"distinct non-negative"),
    (
        "cli_bool_for_count",
        ["--method", "ship", "--method_kwargs", '{"num_prototypes": true}'],
        r"num_prototypes must be an integer, got True \(bool\)",
    ),
    ("cli_unknown_method", ["--method", "lora"], r"--method must be one of"),
    ("cli_unknown_backbone_tuning", ["--backbone_tuning", "prefix"], r"backbone tuning must be one of"),
    (
        "cli_lora_bias_without_lora",
        ["--backbone_tuning", "bias", "--lora_bias", "all"],
        r"LoRA bias 'all' needs backbone tuning 'lora', got 'bias'",
    ),
    ("cli_unknown_lora_bias", ["--lora_bias", "lora_only"], r"argument --lora_bias.*invalid choice: .lora_only."),
    ("cli_dora_without_lora", ["--backbone_tuning", "bias", "--lora_dora", "true"], r"DoRA needs backbone tuning"),
    ("cli_pissa_without_lora", ["--backbone_tuning", "bias", "--lora_init", "pissa"], r"LoRA init 'pissa' needs"),
    ("cli_unknown_lora_init", ["--lora_init", "gaussian"], r"argument --lora_init.*invalid choice: .gaussian."),
    ("cli_absurd_batch", ["--batch_size", "10000000"], r"batch_size=10000000 is far beyond"),
    (
        "cli_zero_train_images",
        ["--train_images_per_class", "0"],
        r"--train_images_per_class must be a positive integer, got 0",
    ),
    (
        "cli_negative_eval_images",
        ["--eval_images_per_class", "-3"],
        r"--eval_images_per_class must be a positive integer",
    ),
    ("cli_zero_embedding_dim", ["--embedding_dim", "0"], r"embedding_dim must be a positive integer"),
    ("cli_float_seed", ["--seed", "1.7"], r"argument --seed: invalid int value"),
]


def _yaml_case(text):
    return lambda c: c.yaml(text + "\n")


def _cli_case(extra):
    return lambda c: c.parse(*extra)


# (id, what the user did, expected error type, message that must appear); parse errors end the script with the
# message on stderr (SystemExit)
CASES = [
    *((name, _yaml_case(text), SystemExit, message) for name, text, message in YAML_CASES),
    *((name, _cli_case(extra), SystemExit, message) for name, extra, message in CLI_CASES),
    (
        "yaml_missing_file",
        lambda c: c.script.parse_args(["--config", str(c.tmp / "absent.yaml")]),
        SystemExit,
        r"absent\.yaml: cannot read it",
    ),
    (
        "value_text_for_number",
        lambda c: check_value("learning_rate", "fast", float),
        ConfigError,
        r"learning_rate must be a number, got 'fast'",
    ),
    # -- output folder (point 4) -- was: the first run's adapter silently replaced
    (
        "existing_adapter",
        _occupied_output,
        OutputDirExistsError,
        r"already holds an adapter; refusing to overwrite it\. Pass --overwrite_output_dir",
    ),
    ("output_dir_is_a_file", _output_is_a_file, OutputDirExistsError, r"exists and is not a folder"),
    # -- backbone source and the Hub (points 5, 8) -- was: 70 retry lines; push refused after training
    (
        "local_backbone_missing",
        lambda c: c.main("--backbone", str(c.tmp / "nope")),
        ConfigError,
        r"not a model folder \(no such folder\)",
    ),
    ("local_backbone_without_config", _backbone_without_config, ConfigError, r"no config\.json in it"),
    (
        "hub_backbone_unreachable",
        _hub_backbone_offline,
        HubUnreachableError,
        (
            r"Could not reach the Hugging Face Hub at http://127\.0\.0\.1:\d+ to download the backbone "
            r"'facebook/dinov2-small'.*pass a local folder: --backbone <dir>"
        ),
    ),
    (
        "hub_offline_mode_not_cached",
        _offline_mode_not_cached,
        HubUnreachableError,
        r"HF_HUB_OFFLINE is set and the model is not in the local Hub cache.*--backbone <dir>",
    ),
    (
        "push_without_repo_id",
        lambda c: c.main("--push_to_hub", "true"),
        ConfigError,
        r"--push_to_hub needs --hub_model_id",
    ),
    (
        "push_invalid_repo_id",
        lambda c: c.main("--push_to_hub", "true", "--hub_model_id", "me/bad id!"),
        ConfigError,
        r"--hub_model_id 'me/bad id!' is not a valid Hub repo id",
    ),
    (
        "push_local_backbone_without_hub_id",
        lambda c: c.main("--push_to_hub", "true", "--hub_model_id", "me/run"),
        ConfigError,
        r"--backbone '.*backbone' is a local path.*pass --base_model_hub_id",
    ),
    (
        "push_local_base_model_hub_id",
        lambda c: c.main(
            "--push_to_hub", "true", "--hub_model_id", "me/run", "--base_model_hub_id", str(c.workspace / "backbone")
        ),
        ConfigError,
        r"--base_model_hub_id '.*' is a local path",
    ),
    (
        "push_hub_unreachable",
        _push_offline,
        HubUnreachableError,
        r"Could not reach the Hugging Face Hub .* to create 'me/run' for --push_to_hub",
    ),
    (
        "push_adapter_unreachable",
        _push_adapter_offline,
        HubUnreachableError,
        r"to push the adapter to 'me/adapter'.*Nothing was published",
    ),
    (
        "peft_push_to_hub_unreachable",
        _peft_push_offline,
        HubUnreachableError,
        r"Could not reach the Hugging Face Hub .* to push 'me/adapter' \(ConnectError.*Nothing was published",
    ),
    # -- image data (point 7) -- was: a traceback at step 0
    (
        "truncated_image",
        lambda c: c.main(*c.images(_truncate)),
        BadImagesError,
        r"1 of 48 images are unusable.*0\.jpg: OSError: Truncated.*listed in .*bad_images\.txt.*--skip_bad_images",
    ),
    ("empty_image", lambda c: c.main(*c.images(_empty)), BadImagesError, r"empty\.jpg: file is empty"),
    (
        "text_file_as_image",
        lambda c: c.main(*c.images(_not_an_image)),
        BadImagesError,
        r"notes\.jpg: .*cannot identify image file",
    ),
    ("tiny_image", lambda c: c.main(*c.images(_tiny)), BadImagesError, r"tiny\.png: image is too small: 2×2"),
    # -- paths inside data sets (point 3) -- was: the job read any local file a row pointed at
    (
        "parquet_absolute_path",
        lambda c: c.parquet(["/etc/hostname"]),
        UnsafeImagePathError,
        r"1 image row\(s\) hold a file path outside the data set's folder.*row \d+: /etc/hostname",
    ),
    (
        "parquet_parent_path",
        lambda c: c.parquet(["../../secret.png"]),
        UnsafeImagePathError,
        r"outside the data set's folder.*\.\./\.\./secret\.png",
    ),
    (
        "parquet_chained_url",
        lambda c: c.parquet(["zip://a.png::/tmp/archive.zip"]),
        UnsafeImagePathError,
        r"zip://a\.png::/tmp/archive\.zip",
    ),
    ("parquet_symlink_out", _parquet_symlink_out, UnsafeImagePathError, r"row \d+: link\.png"),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_with_a_clear_message(case, script, workspace, tmp_path, monkeypatch, capsys):
    _, action, error_type, message = case
    ctx = Context(script, workspace, tmp_path, monkeypatch)
    started = time.monotonic()
    with pytest.raises(error_type) as info:
        action(ctx)
    text = capsys.readouterr().err if error_type is SystemExit else str(info.value)
    assert re.search(message, text, flags=re.DOTALL), text
    assert time.monotonic() - started < 60  # refused before any training or retry loop


def test_the_table_is_large_enough():
    from test_strict_loading import DAMAGES, ENTRY_POINTS

    assert len(CASES) + len(DAMAGES) * len(ENTRY_POINTS) >= 60
