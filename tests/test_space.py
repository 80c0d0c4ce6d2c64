import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hwnas.errors import SpaceError
from hwnas.nn.supernet import SubNet
from hwnas.space import Arch, SearchSpace, all_op_specs, arch_flops, arch_params, resolve_ops


def test_default_space_matches_spos():
    sp = SearchSpace()
    assert sp.stage_layers == (4, 4, 8, 4)
    assert sp.widths() == (64, 160, 320, 640)
    layers = sp.layers()
    assert [layer.stride for layer in layers if layer.stride == 2] == [2, 2, 2, 2]
    for layer in layers:
        if layer.stride == 2:
            assert "skip" not in layer.choices
        else:
            assert set(layer.choices) == {"k3", "k5", "k7", "xc", "skip"}
    assert sp.channel_scales == tuple(round(0.2 * i, 1) for i in range(1, 11))


def test_arch_string_round_trip(tiny_space):
    rng = random.Random(0)
    for _ in range(50):
        a = tiny_space.sample(rng)
        s = a.to_string(tiny_space)
        assert tiny_space.parse(s) == a
        assert Arch.parse(a.to_string()) == a  # flat form too
        assert "/" in s and " " not in s


def test_hash_is_stable_and_content_based():
    a, b = SearchSpace(), SearchSpace(name="other name")
    assert a.hash == b.hash  # the name does not change shapes
    assert SearchSpace(embed_dim=64).hash != a.hash
    assert SearchSpace.from_dict(a.to_dict()) == a
    # Pinned: a change of this value means every latency table and checkpoint is invalid.
    assert a.hash == "c97e7325190f"  # v2: skip = channel shuffle, shared 3x3 proj


def test_bad_arch_strings_are_clear(tiny_space):
    with pytest.raises(SpaceError, match="bad arch token"):
        tiny_space.parse("k9@1")
    with pytest.raises(SpaceError, match="layers"):
        tiny_space.parse("k3@1,k3@1")
    first_is_stride2 = ["skip"] + ["k3@1"] * (tiny_space.num_layers - 1)
    with pytest.raises(SpaceError, match="stride-1"):
        tiny_space.parse(",".join(first_is_stride2))
    with pytest.raises(SpaceError, match="channel scale"):
        tiny_space.parse(",".join(["k3@0.7"] * tiny_space.num_layers))


def test_bad_spec_is_clear():
    with pytest.raises(SpaceError, match="must exceed"):
        SearchSpace(stage_widths=(64, 32, 320, 640))
    with pytest.raises(SpaceError, match="unknown ops"):
        SearchSpace(ops=("k3", "k9"))
    with pytest.raises(SpaceError, match="unknown keys"):
        SearchSpace.from_dict({"input_sise": 32})


def _torch_counts(space, arch):
    net = SubNet(space, arch).eval()
    x = torch.randn(1, space.in_channels, space.input_size, space.input_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    return fc.get_total_flops(), sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("which", ["smallest", "largest"] + [f"random{i}" for i in range(20)])
def test_flops_params_match_torch(which):
    sp = SearchSpace(input_size=64)
    arch = getattr(sp, which)() if which in ("smallest", "largest") else sp.sample(int(which[6:]))
    flops, params = _torch_counts(sp, arch)
    assert abs(arch_flops(sp, arch) - flops) <= 0.01 * flops
    assert abs(arch_params(sp, arch) - params) <= 0.01 * params


def test_budget_range_is_wide():
    sp = SearchSpace()
    lo, hi = arch_flops(sp, sp.smallest()), arch_flops(sp, sp.largest())
    assert hi / lo >= 10
    for i in range(20):  # the extremes really are extremes
        f = arch_flops(sp, sp.sample(i))
        assert lo <= f <= hi


def test_resolve_ops_keys(tiny_space):
    arch = tiny_space.largest()
    ops = resolve_ops(tiny_space, arch)
    assert ops[0].kind == "stem" and ops[-1].kind == "head"
    assert len(ops) == tiny_space.num_layers + 2
    key = ops[1].key()
    assert key.startswith("shufflenet-k7-s2-in16x16x8-out8x8x16-mid") or key.startswith("xception")
    keys = {o.key() for o in all_op_specs(tiny_space)}
    for i in range(30):  # the table covers every op of every arch
        for o in resolve_ops(tiny_space, tiny_space.sample(i)):
            assert o.kind == "skip" or o.key() in keys
