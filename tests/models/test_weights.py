"""Weight sources: safetensors and .bin checkpoints read tensor by tensor; dummy weights."""
from __future__ import annotations

import pytest
import torch

from graphgen.models import build_spec, hf_config_from_dir
from graphgen.models.base import WeightSpec
from graphgen.models.weights import CheckpointWeights, DummyWeights, find_checkpoint


def test_safetensors_tensors_match_the_model(opt_ckpt):
    path, model = opt_ckpt
    spec = build_spec(hf_config_from_dir(path))
    src = CheckpointWeights(path)
    state = model.state_dict()
    for layer in spec.layers:
        for w in layer.weights:
            assert torch.equal(src.get(w, torch.float32), state[w.source])


def test_bin_checkpoint_is_read(tmp_path, opt_ckpt):
    """Older checkpoints (pytorch_model.bin, keys without the 'model.' prefix) load too."""
    path, model = opt_ckpt
    state = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    spec = build_spec(hf_config_from_dir(tmp_path))
    src = CheckpointWeights(tmp_path)
    w = spec.layers[1].weights[2]
    assert torch.equal(src.get(w, torch.float32), model.state_dict()[w.source])


def test_missing_tensor_and_shape_mismatch_are_explained(opt_ckpt):
    path, _ = opt_ckpt
    src = CheckpointWeights(path)
    with pytest.raises(KeyError, match="right model family"):
        src.get(WeightSpec("x", "model.decoder.nothing.weight", (2, 2)), torch.float32)
    with pytest.raises(ValueError, match="shape"):
        src.get(WeightSpec("x", "model.decoder.embed_tokens.weight", (2, 2)), torch.float32)


def test_dummy_weights_are_deterministic_and_shaped():
    w = WeightSpec("q.weight", "layers.0.q.weight", (8, 4))
    a, b = DummyWeights(0).get(w, torch.bfloat16), DummyWeights(0).get(w, torch.bfloat16)
    assert a.shape == (8, 4) and a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert not torch.equal(a, DummyWeights(1).get(w, torch.bfloat16))
    assert (DummyWeights().get(WeightSpec("ln", "ln", (4,), "ones"), torch.float32) == 1).all()


def test_find_checkpoint(opt_ckpt, tmp_path):
    path, _ = opt_ckpt
    assert find_checkpoint(str(path), None) == path
    assert find_checkpoint(str(tmp_path / "missing"), None) is None
    assert find_checkpoint(None, "nobody/no-such-model-here") is None


def test_integer_weights_are_refused_not_cast(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.x.weight": torch.arange(12, dtype=torch.int32).reshape(3, 4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m.safetensors: tensor model.x.weight is stored as torch.int32"):
        CheckpointWeights(tmp_path).get(WeightSpec("x", "model.x.weight", (3, 4)), torch.float32)


def test_a_truncated_safetensors_file_is_named(tmp_path, opt_ckpt):
    from graphgen.models.weights import safetensors_index

    src = next(opt_ckpt[0].glob("*.safetensors"))
    data = src.read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"checkpoint file {bad} cannot be read .*download it again"):
        CheckpointWeights(tmp_path)
    with pytest.raises(ValueError, match=f"checkpoint file {bad} is truncated"):
        safetensors_index(bad)


class Payload:
    def __reduce__(self):
        return (print, ("payload ran",))


def test_a_pickle_with_code_is_refused_with_a_clear_error(tmp_path, capsys):
    torch.save({"model.x.weight": torch.ones(2), "extra": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="holds Python objects besides tensors.*safetensors"):
        CheckpointWeights(tmp_path)
    assert "payload ran" not in capsys.readouterr().out


@pytest.mark.parametrize("key,value,match", [("num_hidden_layers", -1, "num_hidden_layers=-1 must be a positive"),
                                             ("num_attention_heads", 0, "num_attention_heads=0 must be a positive"),
                                             ("num_attention_heads", 5, "hidden_size=32 is not a multiple")])
def test_a_checkpoint_config_that_builds_no_model_is_refused(tmp_path, opt_ckpt, key, value, match):
    import json

    cfg = json.loads((opt_ckpt[0] / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json: {match}"):
        build_spec(hf_config_from_dir(tmp_path))
