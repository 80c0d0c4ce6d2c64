import numpy as np
import pytest
import torch

from hwnas.data import Preprocess, SplitConfig, make_splits, materialize, omniglot
from hwnas.nn.supernet import SubNet, Supernet, calibration_batches, recalibrate_bn
from hwnas.space import SKIP, Arch


@pytest.fixture(scope="module")
def real_images(omniglot_dir):
    col = omniglot(omniglot_dir)
    s = make_splits(col, SplitConfig(protocol="open"))
    pre = Preprocess(32, 1, (0.92,), (0.27,))
    a = materialize(col, s.parts["train"][:192], pre)
    return pre.normalize(torch.from_numpy(a.images))


def test_extract_equals_supernet_path_on_real_images(tiny_space, real_images):
    torch.manual_seed(0)
    net = Supernet(tiny_space)
    batches = list(real_images[:128].split(32))
    for arch in [tiny_space.smallest(), tiny_space.largest()] + [tiny_space.sample(i) for i in range(6)]:
        recalibrate_bn(net, batches, arch)
        sub = net.extract(arch).eval()
        with torch.no_grad():
            a, b = net(real_images[128:], arch), sub(real_images[128:])
        assert (a - b).abs().max().item() < 1e-5
        assert torch.allclose(a.norm(dim=1), torch.ones(len(a)), atol=1e-5)  # L2-normalized
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in net.parameters())


def test_recalibration_is_exact_mean(tiny_space, real_images):
    """After recalibration the stem BN holds the exact mean of its inputs over all batches."""
    torch.manual_seed(0)
    net = Supernet(tiny_space)
    arch = tiny_space.sample(1)
    batches = list(real_images.split(48))
    n = recalibrate_bn(net, batches, arch)
    assert n == len(real_images) and not net.training
    with torch.no_grad():
        feats = net.stem[0](real_images)
    per_batch = torch.stack([f.mean((0, 2, 3)) for f in feats.split(48)])
    torch.testing.assert_close(net.stem[1].running_mean, per_batch.mean(0), rtol=1e-4, atol=1e-5)


def test_calibration_batches_sample_every_class_of_class_ordered_images():
    """Class folders list images class by class: the recalibration sample must reach past the
    first classes (the first 1024 of 40 classes x 100 images would hold 11 of them)."""
    labels = torch.arange(40).repeat_interleave(100)
    images = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    batches = calibration_batches(images, lambda x: x, seed=0)
    seen = torch.cat(batches)[:, 0, 0, 0].long()
    assert [len(b) for b in batches] == [128] * 8
    assert len(seen.unique()) == 40
    assert torch.equal(seen, torch.cat(calibration_batches(images, lambda x: x, seed=0))[:, 0, 0, 0].long())
    few = calibration_batches(images[:300], lambda x: x, seed=1)
    assert [len(b) for b in few] == [128, 128, 44]


def test_sliced_bn_stats_only_touch_the_slice(tiny_space, real_images):
    torch.manual_seed(0)
    net = Supernet(tiny_space)
    arch = tiny_space.smallest()
    recalibrate_bn(net, list(real_images.split(64)), arch)
    layer, mids = 0, net.mids(arch)
    op = arch.layers[layer][0]
    bn = net.layers[layer][op].bns[0]
    m = mids[layer]
    assert m < bn.num_features
    assert torch.all(bn.running_mean[m:] == 0)  # reset and untouched beyond the slice
    assert torch.any(bn.running_mean[:m] != 0)


def test_one_path_gets_gradients(tiny_space, real_images):
    torch.manual_seed(0)
    net = Supernet(tiny_space).train()
    arch = tiny_space.sample(2)
    net(real_images[:16], arch).sum().backward()
    used = {id(p) for m in net.path_modules(arch) for p in m.parameters()}
    for p in net.parameters():
        if id(p) not in used:
            assert p.grad is None
    layer_ops = [op for op, _ in arch.layers]
    i = next(i for i, op in enumerate(layer_ops) if op != "skip")
    assert net.layers[i][layer_ops[i]].convs[0].weight.grad is not None


def test_standalone_subnet_has_exact_shapes(tiny_space):
    net = Supernet(tiny_space)
    arch = tiny_space.sample(4)
    sub = net.extract(arch)
    for block, (op, _), mid in zip(sub.layers, arch.layers, net.mids(arch)):
        if op == "skip":
            assert isinstance(block, torch.nn.Identity)  # folded into the next unit
        else:
            assert block.convs[1].weight.shape[0] in (mid, block.convs[0].weight.shape[0])
            assert all(b.num_features == c.out_channels for b, c in zip(block.bns, block.convs))
    np.testing.assert_equal(sub.arch, arch)


def test_every_choice_of_a_layer_keeps_the_channel_layout(tiny_space, real_images):
    """Whichever choice a layer takes, the channels that bypass its branch come out at the
    same positions: a skip applies the units' shuffle, and a stride-2 layer's ops share one
    projection. (With an identity skip and a projection per op, a trained path's loss rose
    4-7x when one layer changed, and random-path training collapsed.)"""
    torch.manual_seed(0)
    net = Supernet(tiny_space).eval()
    x = net.stem(real_images[:16])
    with torch.no_grad():
        for i, (layer, blocks) in enumerate(zip(tiny_space.layers(), net.layers)):
            outs = {op: (net.shuffle(x) if op == SKIP else
                         blocks[op](x, None, net.projs[str(i)] if str(i) in net.projs else None))
                    for op in layer.choices}
            half = next(iter(outs.values())).shape[1] - next(
                b for b in blocks.values()).branch_out
            first = next(iter(outs.values()))[:, :half]
            for op, out in outs.items():
                assert torch.equal(out[:, :half], first), (i, op)
            if layer.stride == 1:
                assert torch.equal(first, x[:, 0::2])
            x = outs[layer.choices[0]]


def test_path_warmup_opens_from_the_anchor_to_uniform(tiny_space):
    from hwnas.compat.tasks import ArchSampler

    s = ArchSampler(tiny_space, 0, warmup=0.5)
    anchor = tiny_space.anchor()
    assert s(0, 0, progress=0.0) == anchor  # all layers from the anchor at the start
    assert s(3, 7, progress=0.3) == s(3, 7, progress=0.3)  # the same on every rank
    n = len(anchor.layers)

    def anchored(progress):
        return np.mean([sum(a == b for a, b in zip(s(1, k, progress).layers, anchor.layers)) / n
                        for k in range(300)])

    p_same_uniform = anchored(1.0)  # chance that a uniform choice equals the anchor's
    assert anchored(0.25) > 0.45 and anchored(0.25) > p_same_uniform + 0.3
    assert abs(anchored(0.6) - p_same_uniform) < 0.05  # past the warm-up: uniform
    with pytest.raises(Exception, match="path_warmup"):
        ArchSampler(tiny_space, 0, warmup=1.5)
    assert isinstance(anchor, Arch)


def test_spread_path_sampling_trains_shallow_paths_too(tiny_space):
    """supernet.path_sampling: spread draws each path's depth first: valid archs of the space,
    reproducible per step, and a real share of them cheaper than nearly every uniform path
    (those a tight latency budget searches); a value it does not know is refused by name, and
    the setting is part of the supernet step's key (a change retrains the supernet)."""
    import random

    from hwnas.compat.tasks import ArchSampler
    from hwnas.config import SupernetConfig
    from hwnas.errors import HwnasError
    from hwnas.space import arch_flops

    s = ArchSampler(tiny_space, 0, sampling="spread")
    assert s(2, 5) == s(2, 5)
    spread = [s(0, k) for k in range(400)]
    assert all(tiny_space.parse(a.to_string(tiny_space)) == a for a in spread[:50])
    rng = random.Random(1)
    low = np.percentile([arch_flops(tiny_space, tiny_space.sample(rng)) for _ in range(400)], 2)
    assert np.mean([arch_flops(tiny_space, a) < low for a in spread]) > 0.1
    with pytest.raises(HwnasError, match="path_sampling"):
        ArchSampler(tiny_space, 0, sampling="fair")
    # a FLOPs range at the cheap end: spread paths fall in it, uniform ones hardly ever
    fmin = arch_flops(tiny_space, tiny_space.smallest())
    cheap = [fmin / 1e6, (fmin + 0.5 * (low - fmin)) / 1e6]  # (uniform: 0.01% of paths here, spread 1.3%)
    assert all(cheap[0] * 1e6 <= arch_flops(tiny_space, ArchSampler(tiny_space, 0, cheap, sampling="spread")(0, k))
               <= cheap[1] * 1e6 for k in range(20))
    with pytest.raises(HwnasError, match="set supernet.path_sampling: spread"):
        ArchSampler(tiny_space, 0, cheap, max_tries=50)(0, 0)
    with pytest.raises(HwnasError, match="path_sampling 'fair' must be uniform"):
        SupernetConfig(path_sampling="fair")
    from hwnas.config import Config
    from hwnas.pipeline import step_keys

    cfg = Config()
    before = step_keys(cfg)
    cfg.supernet.path_sampling = "spread"
    after = step_keys(cfg)
    assert after["train-supernet"] != before["train-supernet"] and after["train-gallery"] == before["train-gallery"]


def test_deploy_form_folds_permutations_into_weights(tiny_space):
    """``SubNet.deploy_form`` computes the same function (random archs, both unit kinds,
    non-trivial BatchNorm statistics) with the permutations skips leave before stride-2 units
    and the head folded into their weights: the exported graph keeps Gathers only for
    stride-1 units after a skip (two each), and the L2 normalization is three nodes."""
    import random

    import onnx

    from hwnas.export.onnx import export_onnx
    from hwnas.nn.blocks import ChoiceBlock

    rng = random.Random(0)
    x = torch.randn(3, 1, 32, 32)
    n_folded = 0
    for _ in range(8):
        arch = tiny_space.sample(rng)
        net = SubNet(tiny_space, arch).eval()
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
        units = [b for b in net.layers if isinstance(b, ChoiceBlock)]
        n_folded += sum(b.stride == 2 and b.in_perm is not None for b in units) + (net.head_perm is not None)
        stride1_after_skip = sum(b.stride == 1 and b.in_perm is not None for b in units)
        perms_before = [b.in_perm is None for b in units]
        folded = net.deploy_form()
        assert folded.head_perm is None and all(b.in_perm is None for b in folded.layers
                                                if isinstance(b, ChoiceBlock) and b.stride == 2)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=0)
        ops = [n.op_type for n in onnx.load_from_string(export_onnx(net, (1, 1, 32, 32))).graph.node]
        assert ops.count("Gather") == 2 * stride1_after_skip
        assert "Expand" not in ops and ops.count("ReduceL2") == 1
        # the original keeps its permutations (deploy_form works on a copy)
        assert [b.in_perm is None for b in units] == perms_before
    assert n_folded >= 4  # the sampled archs did exercise the fold


def test_skips_cost_no_op_in_the_exported_subnet(tiny_space, real_images):
    """A deployed subnet folds each skipped layer's channel shuffle into the next unit: the
    exported graph has one Concat per unit and no Slice/Concat for a skip, and ONNX Runtime
    gives what the supernet path gives."""
    import onnx
    import onnxruntime as ort

    from hwnas.export.onnx import export_onnx

    torch.manual_seed(0)
    net = Supernet(tiny_space)
    layers = tiny_space.layers()
    arch = Arch(tuple((SKIP, None) if SKIP in l.choices else ("k3", 1.0) for l in layers))
    recalibrate_bn(net, list(real_images[:96].split(32)), arch)
    sub = net.extract(arch).eval()
    data = export_onnx(sub, (1, 1, 32, 32))
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    n_units = sum(op != SKIP for op, _ in arch.layers)
    assert ops.count("Concat") == n_units
    # every skip here ends before a stride-2 unit or the head, which fold it into weights
    assert ops.count("Gather") == 0
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = real_images[100:101]
    with torch.no_grad():
        ref = net(x, arch).numpy()
    np.testing.assert_allclose(sess.run(None, {"image": x.numpy()})[0], ref, atol=1e-4)
