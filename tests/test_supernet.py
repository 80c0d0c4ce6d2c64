import numpy as np
import pytest
import torch

from hwnas.data import Preprocess, SplitConfig, make_splits, materialize, omniglot
from hwnas.nn.supernet import Supernet, recalibrate_bn


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
            assert isinstance(block, torch.nn.Identity)
        else:
            assert block.convs[1].weight.shape[0] in (mid, block.convs[0].weight.shape[0])
            assert all(b.num_features == c.out_channels for b, c in zip(block.bns, block.convs))
    np.testing.assert_equal(sub.arch, arch)
