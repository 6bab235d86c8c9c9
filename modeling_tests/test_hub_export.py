"""Export for the Hub: the folder loads as remote code in a process where zaya_hf cannot be imported, with the same
logits and greedy tokens as the package, and into transformers' own ZAYA without remote code; `save_pretrained`
(what `push_to_hub` uploads) writes the same files."""

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_config
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import zaya_hf
from zaya_hf import ZayaForCausalLM, export_for_hub
from zaya_hf.checkpoints import CheckpointError, convert_checkpoint, remote_code_files
from zaya_hf.checkpoints import hub as hub_module
from zaya_hf.modeling_zaya import REMOTE_CODE_AUTO_MAP

PROMPT = "w5 w17 w42 w99 w8 w23 w61"
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary (101 ids), built in process."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 101)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    model = randomize(ZayaForCausalLM(tiny_config()), seed=5).eval()
    # The skip class keeps its ZAYA1-8B bias of -1: transformers' ZAYA resets that one bias to -1 when it loads a
    # checkpoint (its `_init_weights` assigns it outside the loaded-weights guard), whatever the checkpoint holds.
    for layer in model.model.layers:
        layer.mlp.gate.balancing_biases[-1] = -1.0
    tokenizer = tiny_tokenizer()
    report = export_for_hub(model, root / "export", tokenizer=tokenizer, repo_id="someone/zaya-tiny", license="apache-2.0")
    return model, tokenizer, root / "export", report


def test_export_folder_holds_weights_config_code_tokenizer_and_card(exported):
    model, _, folder, report = exported
    files = {p.name for p in folder.iterdir()}
    code = {f.name for f in remote_code_files()}
    assert {"modeling_zaya.py", "configuration_zaya.py", "cache_zaya.py"} <= code <= files
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors"} | TOKENIZER_FILES <= files
    assert json.loads((folder / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP
    assert report.forward_checked and report.layout == "current"
    for file in remote_code_files():  # the code shipped is the package's
        assert (folder / file.name).read_bytes() == file.read_bytes()

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert {"zaya", "custom_code"} <= set(card.data.tags) and card.data.license == "apache-2.0"
    assert 'from_pretrained("someone/zaya-tiny", dtype="auto", trust_remote_code=True)' in card.text
    assert f"{model.config.num_experts} experts" in card.text

    # Where zaya_hf is imported its classes serve, whether or not remote code is trusted.
    for trust_remote_code in (None, True):
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code)
        assert type(loaded) is ZayaForCausalLM


def test_save_pretrained_writes_the_same_files_as_the_export(exported, tmp_path):
    """`push_to_hub` uploads what `save_pretrained` writes (plus its own model card)."""
    model, _, folder, _ = exported
    model.save_pretrained(tmp_path)
    exported_files = {p.name for p in folder.iterdir()} - TOKENIZER_FILES - {"README.md"}
    assert {p.name for p in tmp_path.iterdir()} == exported_files
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP
    saved, exported_tensors = load_folder(tmp_path), load_folder(folder)
    assert saved.keys() == exported_tensors.keys()
    assert all(torch.equal(saved[name], exported_tensors[name]) for name in saved)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["zaya_hf"] = None  # `import zaya_hf` now raises ImportError: only the shipped code can serve
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.zaya.modeling_zaya import ZayaForCausalLM as TransformersZaya

    folder, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(int(sys.argv[3]))  # as in the test process: bit-identical results need the same reductions
    try:
        import zaya_hf
        raise SystemExit("zaya_hf is importable")
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer(%(prompt)r, return_tensors="pt").input_ids
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    builtin, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    with torch.no_grad():
        results = {
            "ids": ids,
            "logits": model(ids).logits,
            "hidden": base(ids).last_hidden_state,
            "greedy": model.generate(ids, max_new_tokens=6, do_sample=False),
            "builtin_logits": builtin.eval()(ids).logits,
            "builtin_state": builtin.state_dict(),
        }
    results["modules"] = {
        "config": type(config).__module__,
        "model": type(model).__module__,
        "base": type(base).__module__,
        "cache": type(model.generate(ids, max_new_tokens=1, return_dict_in_generate=True).cache).__module__,
    }
    results["builtin_is_transformers_zaya"] = type(builtin) is TransformersZaya
    results["builtin_loading_info"] = {k: sorted(v) for k, v in info.items() if k != "error_msgs"}
    results["bias_dtypes"] = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype)
        biases = [layer.mlp.gate.balancing_biases for layer in loaded.model.layers]
        results["bias_dtypes"][str(dtype)] = (loaded.dtype, {b.dtype for b in biases}, torch.stack(biases))
    model.save_pretrained(out + "/resaved")  # what push_to_hub would upload from this environment
    results["zaya_hf_modules"] = sorted(name for name in sys.modules if name.startswith("zaya_hf") and sys.modules[name])
    torch.save(results, out + "/results.pt")
    """
)


@torch.no_grad()
def test_export_loads_without_zaya_hf_and_matches_the_package(exported, tmp_path):
    model, tokenizer, folder, _ = exported
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT % {"prompt": PROMPT})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    run = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path), str(torch.get_num_threads())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "results.pt", weights_only=False)

    assert all(module.startswith("transformers_modules.") for module in remote["modules"].values()), remote["modules"]
    assert remote["modules"]["model"].endswith(".modeling_zaya") and remote["modules"]["cache"].endswith(".cache_zaya")
    assert remote["zaya_hf_modules"] == []

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(remote["ids"], ids)
    assert torch.equal(remote["logits"], model(ids).logits)
    assert torch.equal(remote["hidden"], model.model(ids).last_hidden_state)
    assert torch.equal(remote["greedy"], model.generate(ids, max_new_tokens=6, do_sample=False))

    # Without trust_remote_code: transformers' own ZAYA, every tensor used, nothing left out.
    assert remote["builtin_is_transformers_zaya"]
    assert remote["builtin_loading_info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    state = model.state_dict()
    assert remote["builtin_state"].keys() == state.keys()
    assert all(torch.equal(remote["builtin_state"][name], state[name]) for name in state)
    assert (remote["builtin_logits"] - model(ids).logits).abs().max().item() <= 1e-5

    expected_biases = torch.stack([layer.mlp.gate.balancing_biases for layer in model.model.layers])
    for dtype, (model_dtype, bias_dtypes, biases) in remote["bias_dtypes"].items():
        assert str(model_dtype) == dtype and bias_dtypes == {torch.float32}, dtype
        assert torch.equal(biases, expected_biases), dtype

    resaved = tmp_path / "resaved"
    code = {f.name for f in remote_code_files()}
    assert code <= {p.name for p in resaved.iterdir()}
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == REMOTE_CODE_AUTO_MAP


def test_export_from_a_folder_matches_export_from_the_model(exported, tmp_path):
    """A saved folder and its legacy form export to the same weights, config and code as the model itself."""
    model, tokenizer, folder, _ = exported
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    convert_checkpoint(tmp_path / "saved", tmp_path / "legacy", to="legacy", progress=False)
    for source in ("saved", "legacy"):
        export_for_hub(tmp_path / source, tmp_path / f"from_{source}", repo_id="someone/zaya-tiny", license="apache-2.0")
        other = tmp_path / f"from_{source}"
        weights = lambda f: {p.name for p in f.iterdir() if "safetensors" in p.name}  # noqa: E731
        assert {p.name for p in other.iterdir()} - weights(other) == {p.name for p in folder.iterdir()} - weights(folder)
        assert (other / "README.md").read_text() == (folder / "README.md").read_text()
        for name in [f.name for f in remote_code_files()] + sorted(TOKENIZER_FILES):
            assert (other / name).read_bytes() == (folder / name).read_bytes(), name
        config, reference = (json.loads((f / "config.json").read_text()) for f in (other, folder))
        assert {k: v for k, v in config.items() if k != "transformers_version"} == {
            k: v for k, v in reference.items() if k != "transformers_version"
        }
        exported_tensors, reference_tensors = load_folder(other), load_folder(folder)
        assert exported_tensors.keys() == reference_tensors.keys()
        assert all(torch.equal(exported_tensors[k], reference_tensors[k]) for k in reference_tensors)


def test_remote_code_files_follow_relative_imports_transitively(tmp_path, monkeypatch):
    (tmp_path / "modeling_zaya.py").write_text("import torch\nfrom .configuration_zaya import C\nfrom .cache_zaya import K\n")
    (tmp_path / "configuration_zaya.py").write_text("X = 1\n")
    (tmp_path / "cache_zaya.py").write_text("try:\n    from .kernels_zaya import k\nexcept ImportError:\n    k = None\n")
    (tmp_path / "kernels_zaya.py").write_text("from .configuration_zaya import X\n")
    monkeypatch.setattr(hub_module, "modeling_zaya", types.SimpleNamespace(__file__=str(tmp_path / "modeling_zaya.py")))
    names = sorted(f.name for f in remote_code_files())
    assert names == ["cache_zaya.py", "configuration_zaya.py", "kernels_zaya.py", "modeling_zaya.py"]

    for bad in ("from . import cache_zaya", "from ..utils import x", "from .ops.triton import k", "import zaya_hf"):
        (tmp_path / "kernels_zaya.py").write_text(f"{bad}\n")
        with pytest.raises(CheckpointError, match=rf"kernels_zaya\.py has `{re.escape(bad)}`, which breaks loading as remote"):
            remote_code_files()
    (tmp_path / "kernels_zaya.py").write_text("from .missing_zaya import y\n")
    with pytest.raises(CheckpointError, match=r"kernels_zaya\.py imports missing_zaya relatively"):
        remote_code_files()


def test_package_code_is_flat_and_complete():
    files = remote_code_files()
    assert files[0].name == "modeling_zaya.py"
    assert all(f.parent == Path(zaya_hf.__file__).parent for f in files)


def test_export_refusals(exported, tmp_path):
    model, _, folder, _ = exported
    with pytest.raises(FileExistsError):
        export_for_hub(model, folder)
    with pytest.raises(TypeError, match="ZayaForCausalLM or a checkpoint folder"):
        export_for_hub(model.model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_export_command_line(exported, tmp_path, capsys):
    model, tokenizer, _, _ = exported
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "tok")
    argv = [str(tmp_path / "saved"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok"), "--repo-id", "me/zaya-cli"]
    assert hub_module.main(argv + ["--no-progress"]) == 0
    assert "current layout" in capsys.readouterr().out
    assert TOKENIZER_FILES <= {p.name for p in (tmp_path / "out").iterdir()}
    assert '"me/zaya-cli"' in (tmp_path / "out" / "README.md").read_text()
    assert hub_module.main(argv) == 2 and "not an empty folder" in capsys.readouterr().err
