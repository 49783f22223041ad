"""passes/delegate_cpu_attention.py: decode attention runs where the KV cache lives."""
from .graphs import compiled, config


def test_cpu_attention_delegates_decode_only():
    g, _ = compiled(config(percent=[100, 0, 0, 100, 100, 0], cpu_attention=True),
                    names=["order", "place_tensors", "delegate_cpu_attention"])
    assert g.nodes[(0, 1, 0)]["attn_device"] == "device"  # prefill stays on the device
    assert g.nodes[(2, 1, 0)]["attn_device"] == "host"


def test_without_the_flag_attention_stays_on_the_device():
    g, _ = compiled(config(percent=[100, 0, 0, 100, 100, 0]), names=["order", "place_tensors", "delegate_cpu_attention"])
    assert {g.nodes[(i, 1, 0)]["attn_device"] for i in range(3)} == {"device"}
