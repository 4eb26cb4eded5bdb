"""FID / Inception Score: the Fréchet distance, the score, the plain-torch Inception-v3 and the batching helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alignment.errors import ConfigError
from alignment.metrics.fid import (FeatureExtractor, compute_fid, compute_inception_score, extract_features,
                                   feature_statistics, fid, frechet_distance, inception_score, sqrtm_psd)
from alignment.metrics.inception import InceptionV3, _pool3x3, load_weight_file

# --------------------------------------------------------------------------------------------- Fréchet distance


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=g), torch.randn(6, generator=g)
    v1, v2 = torch.rand(6, generator=g) + 0.1, torch.rand(6, generator=g) + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())
    got = frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2))
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_general_matches_eigenvalues_of_product():
    """tr((S1 S2)^{1/2}) = Σ sqrt(eig(S1 S2)) — an independent numpy check on full matrices."""
    s1, s2 = _random_spd(8, 1), _random_spd(8, 2)
    mu1, mu2 = torch.zeros(8), torch.ones(8)
    eig = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    expected = 8.0 + np.trace(s1.numpy()) + np.trace(s2.numpy()) - 2 * np.sqrt(eig.real.clip(0)).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(expected), rel=1e-8)


def test_frechet_distance_zero_for_identical_and_symmetric():
    s1, s2 = _random_spd(10, 3), _random_spd(10, 4)
    mu1, mu2 = torch.randn(10), torch.randn(10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    # numpy input works too
    assert frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(
        frechet_distance(mu1, s1, mu2, s2), rel=1e-12)


def test_sqrtm_psd_squares_back_and_tolerates_non_psd_roundoff():
    s = _random_spd(12, 5)
    root = sqrtm_psd(s)
    assert torch.allclose(root @ root, s, atol=1e-10)
    assert torch.allclose(root, root.T)
    # rank-deficient covariance (fewer samples than dims) with a tiny negative eigenvalue: finite, distance >= 0
    f = torch.randn(4, 16, dtype=torch.float64)
    mu, sigma = feature_statistics(f)
    sigma = sigma - 1e-12 * torch.eye(16, dtype=torch.float64)
    assert torch.isfinite(sqrtm_psd(sigma)).all()
    d = frechet_distance(mu, sigma, mu + 0.5, sigma)
    assert np.isfinite(d) and d == pytest.approx(16 * 0.25, rel=1e-6)


def test_feature_statistics_match_numpy_cov_and_fid_properties():
    g = torch.Generator().manual_seed(6)
    a = torch.randn(40, 5, generator=g)
    b = torch.randn(30, 5, generator=g) * 1.5 + 0.3
    mu, sigma = feature_statistics(a)
    assert sigma.dtype == torch.float64
    assert np.allclose(mu.numpy(), a.double().numpy().mean(0))
    assert np.allclose(sigma.numpy(), np.cov(a.double().numpy(), rowvar=False))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert fid(a, b) > 0.1
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(a[:1])
    with pytest.raises(ValueError, match="shapes do not match"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


# --------------------------------------------------------------------------------------------- Inception Score


def test_inception_score_extremes():
    n, c = 40, 8
    assert inception_score(torch.full((n, c), 1.0 / c), splits=4) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert inception_score(torch.zeros(n, c), splits=4)[0] == pytest.approx(1.0)  # identical logits
    # confident, distinct predictions spread evenly over the classes in every split -> IS ≈ C
    labels = torch.arange(n) % c
    logits = 30.0 * torch.nn.functional.one_hot(labels, c).double()
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(c, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    probs = torch.softmax(logits, 1)
    assert inception_score(probs, splits=5)[0] == pytest.approx(mean, rel=1e-9)  # probabilities detected


def test_inception_score_matches_original_formula():
    g = torch.Generator().manual_seed(7)
    preds = torch.softmax(torch.randn(50, 12, generator=g, dtype=torch.float64) * 2, 1).numpy()
    scores = []
    for i in range(5):  # openai/improved-gan inception_score/model.py
        part = preds[i * 50 // 5:(i + 1) * 50 // 5]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(torch.from_numpy(preds), splits=5, from_logits=False)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10) and std == pytest.approx(np.std(scores), rel=1e-8)
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.from_numpy(preds), splits=51)


# --------------------------------------------------------------------------------------------- Inception-v3

# key → shape, taken from torchvision/models/inception.py and pytorch-fid's FID Inception (same module names)
_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_var": (32,),
    "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
    "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "Mixed_7c.branch_pool.bn.num_batches_tracked": (),
}


@pytest.fixture(scope="module")
def tv_model() -> InceptionV3:
    torch.manual_seed(0)
    return InceptionV3("torchvision")


@pytest.fixture(scope="module")
def fid_model() -> InceptionV3:
    torch.manual_seed(1)
    return InceptionV3("fid")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_inception_architecture_matches_public_state_dicts(tv_model, fid_model):
    # torchvision's Inception_V3_Weights.IMAGENET1K_V1 meta: num_params 27161264 (with AuxLogits)
    assert _n_params(tv_model) == 27_161_264
    assert _n_params(InceptionV3("torchvision", aux_logits=False)) == 23_834_568
    assert _n_params(fid_model) == 23_834_568 + 8 * 2048 + 8  # fc has 1008 outputs, no AuxLogits
    tv, fd = tv_model.state_dict(), fid_model.state_dict()
    for key, shape in _KEYS.items():
        assert tuple(tv[key].shape) == shape and tuple(fd[key].shape) == shape, key
    assert tuple(tv["fc.weight"].shape) == (1000, 2048) and tuple(fd["fc.weight"].shape) == (1008, 2048)
    assert tuple(tv["AuxLogits.conv1.conv.weight"].shape) == (768, 128, 5, 5)
    assert tuple(tv["AuxLogits.fc.weight"].shape) == (1000, 768)
    assert not any(k.startswith("AuxLogits") for k in fd)
    assert set(fd) == {k for k in tv if not k.startswith("AuxLogits")}
    assert not any(k.startswith(("maxpool", "avgpool")) for k in tv)
    # the FID network's pooling differences: TF average pools (padding not counted), max pool in Mixed_7c
    assert [fid_model.get_submodule(m).pool for m in ("Mixed_5b", "Mixed_6e", "Mixed_7b", "Mixed_7c")] == \
        ["avg_tf", "avg_tf", "avg_tf", "max"]
    assert {tv_model.get_submodule(m).pool for m in ("Mixed_5b", "Mixed_6e", "Mixed_7b", "Mixed_7c")} == {"avg"}


def test_pool_branches():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert _pool3x3(x, "avg")[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 9)
    assert _pool3x3(x, "avg_tf")[0, 0, 0, 0] == pytest.approx((0 + 1 + 4 + 5) / 4)
    assert _pool3x3(x, "max")[0, 0, 0, 0] == 5


def test_input_convention_matches_torchvision_transform_input(tv_model):
    """ImageNet mean/std normalisation followed by torchvision's transform_input is exactly 2x − 1."""
    x = torch.rand(2, 3, 299, 299, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    normalised = (x - mean) / std
    transformed = normalised * (std / 0.5) + (mean - 0.5) / 0.5
    assert torch.allclose(tv_model.preprocess(x).double(), transformed, atol=1e-6)


def test_forward_shapes_logits_and_gradient(tv_model, fid_model):
    images = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        out = fid_model(images)
    assert out.features.shape == (2, 2048) and out.logits.shape == (2, 1008)
    # FID variant: logits without the fc bias (original IS / torch-fidelity "logits_unbiased")
    assert torch.allclose(out.logits, out.features @ fid_model.fc.weight.T, atol=1e-5)
    # differentiable from pixels: the resize/scaling and the network (checked at 80×80 to keep the test fast)
    small = torch.rand(1, 3, 80, 80, requires_grad=True)
    fid_model.preprocess(small).sum().backward()
    grad_pre = small.grad.clone()
    small.grad = None
    fid_model.forward_features(2 * small - 1).sum().backward()
    assert grad_pre.abs().sum() > 0 and torch.isfinite(small.grad).all() and small.grad.abs().sum() > 0
    with torch.no_grad():
        tv_out = tv_model(images)
        assert tv_out.features.shape == (2, 2048) and tv_out.logits.shape == (2, 1000)
        assert torch.allclose(tv_out.logits, tv_model.fc(tv_out.features), atol=1e-5)
        # same weights, different pooling -> different features
        twin = InceptionV3("fid", num_classes=1000, aux_logits=True)
        twin.load_state_dict(tv_model.state_dict())
        small = 2 * torch.rand(2, 3, 80, 80) - 1
        assert not torch.allclose(twin.forward_features(small), tv_model.forward_features(small))


@pytest.mark.parametrize("variant,suffix", [("fid", ".pth"), ("torchvision", ".safetensors")])
def test_from_file_round_trip(tmp_path, fid_model, tv_model, variant, suffix):
    model = fid_model if variant == "fid" else tv_model
    path = tmp_path / f"{variant}{suffix}"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    loaded = InceptionV3.from_file(path, resize=None)  # variant inferred from the file: 1008 classes -> fid
    assert loaded.variant == variant and loaded.num_classes == model.num_classes
    assert (loaded.AuxLogits is None) == (variant == "fid")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    images = torch.rand(1, 3, 80, 80)  # resize=None: the network runs at 80×80 (its minimum is 75)
    with torch.no_grad():
        out = loaded(images)
        assert torch.equal(out.features, model.forward_features(2 * images - 1))
        assert torch.equal(out.logits, model.logits_from_features(out.features))


def test_from_file_accepts_old_files_without_num_batches_tracked(tmp_path, fid_model):
    state = {k: v for k, v in fid_model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    loaded = InceptionV3.from_file(path, variant="fid")
    assert torch.equal(loaded.fc.weight, fid_model.fc.weight)


def test_from_file_errors_are_one_line(tmp_path, fid_model):
    missing = tmp_path / "nope" / "pt_inception.pth"
    with pytest.raises(ConfigError) as err:
        InceptionV3.from_file(missing)
    assert str(err.value) == f"metrics.inception_weights: {missing} does not exist"
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read") as err:
        load_weight_file(garbage, key="metrics.x")
    assert "\n" not in str(err.value) and str(err.value).startswith("metrics.x: ")
    state = fid_model.state_dict()
    del state["Mixed_6b.branch1x1.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ConfigError, match="1 missing keys .*Mixed_6b.branch1x1.conv.weight.*1 unexpected") as err:
        InceptionV3.from_file(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(ConfigError, match="variant"):
        InceptionV3("tf")


# --------------------------------------------------------------------------------------------- compute_fid / IS


class _RandomProjection:
    """A custom FeatureExtractor: average-pool to 8×8, then a fixed random linear map to 16 dims."""

    def __init__(self, seed: int = 0) -> None:
        self.weight = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(seed))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        return x @ self.weight


def test_compute_fid_with_custom_extractor():
    extractor = _RandomProjection()
    assert isinstance(extractor, FeatureExtractor)
    g = torch.Generator().manual_seed(8)
    a = torch.rand(60, 3, 16, 16, generator=g)
    b = (torch.rand(60, 3, 16, 16, generator=g) * 0.5 + 0.5)
    same = compute_fid(a, a, extractor, batch_size=7)
    assert same == pytest.approx(0.0, abs=1e-6)
    diff = compute_fid(a, b, extractor, batch_size=16)
    assert diff > 1.0
    assert diff == pytest.approx(fid(extractor(a), extractor(b)), rel=1e-5)
    # PIL images and uint8 tensors go through the same path
    a8 = (a * 255).round().to(torch.uint8)
    pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in a8]
    assert torch.allclose(extract_features(pil, extractor, batch_size=25), extract_features(a8, extractor), atol=1e-9)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_fid(a * 2 - 1, b, extractor)


def test_compute_inception_score_with_inception_and_custom_classifier(fid_model):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (24 + i, 20, 3), dtype=np.uint8))
              for i in range(3)]  # different sizes: batched one by one, resized to 299 by the network
    mean, std = compute_inception_score(images, fid_model, splits=1, batch_size=3)
    assert np.isfinite(mean) and mean >= 1.0 - 1e-9 and std >= 0.0

    def classifier(x: torch.Tensor) -> torch.Tensor:  # class = brightest channel, very confident
        return 50.0 * x.mean((2, 3))

    colours = torch.zeros(36, 3, 8, 8)  # 3 splits of 12 images, 4 of each colour
    colours[torch.arange(36), torch.arange(36) % 3] = 1.0
    mean, _ = compute_inception_score(colours, classifier, splits=3)
    assert mean == pytest.approx(3.0, rel=1e-6)
