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


def test_scales_no_short_number_writes_round_trip():
    """An arch string parses back to its arch whatever the scales (1/3 is written in full);
    the usual scales keep their short form, so stored strings do not change."""
    sp = SearchSpace(channel_scales=(1 / 3, 2 / 3, 1.0))
    a = Arch(tuple(("k3", 1 / 3) for _ in sp.layers()))
    assert sp.parse(a.to_string(sp)) == a and Arch.parse(a.to_string()) == a
    assert Arch(tuple(("k5", 0.5) for _ in sp.layers())).to_string().startswith("k5@0.5,")


def test_num_archs_counts_networks():
    """Two scales that round to one width are one network: num_archs counts the canonical
    archs, as enumerating a small space shows."""
    import itertools

    sp = SearchSpace(input_size=16, stem_channels=8, stage_layers=(1, 2), stage_widths=(16, 24),
                     head_channels=16, embed_dim=8, channel_scales=(0.5, 0.75, 1.0, 1.25), channel_divisor=4)
    per_layer = [[(op, None if op == "skip" else sc) for op in layer.choices
                  for sc in ((None,) if op == "skip" else sp.channel_scales)] for layer in sp.layers()]
    per_layer = [list(dict.fromkeys(x)) for x in per_layer]
    nets = {sp.canonical(Arch(tuple(c))) for c in itertools.product(*per_layer)}
    assert sp.num_archs() == len(nets) < len(list(itertools.product(*per_layer)))


def test_hash_is_stable_and_content_based():
    a, b = SearchSpace(), SearchSpace(name="other name")
    assert a.hash == b.hash  # the name does not change shapes
    assert SearchSpace(width_mult=1).hash == a.hash  # one number type: 1 is 1.0
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


def _quickstart_space():
    return SearchSpace(input_size=32, in_channels=1, width_mult=0.5, head_channels=512, embed_dim=128)


def test_canonical_names_one_network_by_one_string():
    """Where rounding to the channel divisor maps several scales to one width (the
    quickstart's first stage: 10 scales, 4 widths), the canonical arch is one per network."""
    sp = _quickstart_space()
    first = sp.layers()[0]
    widths = [sp.mid_channels(first, s) for s in sp.channel_scales]
    assert len(set(widths)) < len(widths)  # the case this is for
    rng = random.Random(0)
    for _ in range(300):
        a = sp.sample(rng)
        c = sp.canonical(a)
        assert sp.canonical(c) == c  # idempotent
        # the same network: every layer's op and middle width, so the same FLOPs
        for layer, (op, s), (cop, cs) in zip(sp.layers(), a.layers, c.layers):
            assert op == cop and (op == "skip" or sp.mid_channels(layer, s) == sp.mid_channels(layer, cs))
        assert arch_flops(sp, a) == arch_flops(sp, c)
    # two strings of one network meet; another width stays apart
    ops = list(sp.smallest().layers)
    same = [Arch(tuple([(first.choices[0], s)] + ops[1:])) for s in (0.6, 0.8, 1.0)]
    assert len({sp.canonical(x) for x in same}) == 1 and sp.canonical(same[0]).layers[0][1] == 0.6
    assert len({sp.canonical(Arch(tuple([(first.choices[0], s)] + ops[1:]))) for s in sp.channel_scales}) == len(set(widths))
    assert sp.canonical(Arch(tuple([(first.choices[0], 1.2)] + ops[1:]))) != sp.canonical(same[0])


def test_the_search_best_archs_are_one_per_network(tmp_path):
    import csv
    import json

    from hwnas.search.runner import top_archs

    sp = _quickstart_space()
    rest = Arch(sp.smallest().layers[1:]).to_string()
    a, a_again, b = (f"k3@{s},{rest}" for s in ("0.6", "1", "1.2"))
    (tmp_path / "best_arch.json").write_text(json.dumps(
        {"arch": a, "reward": 0.7, "predicted_ms": 0.05, "mflops": 1.0}))
    with open(tmp_path / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["state", "feasible", "reward", "arch", "predicted_ms", "mflops"])
        w.writeheader()
        for arch, r in ((a, 0.7), (a_again, 0.69), (b, 0.68)):
            w.writerow({"state": "COMPLETE", "feasible": "True", "reward": r, "arch": arch,
                        "predicted_ms": 0.05, "mflops": 1.0})
    assert [x["arch"] for x in top_archs(tmp_path, 2)] == [a, a_again]  # strings alone
    # networks, each named by its canonical string (in the stage form the search writes)
    assert [x["arch"] for x in top_archs(tmp_path, 2, sp)] == [sp.network(x).to_string(sp) for x in (a, b)]
