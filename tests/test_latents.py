"""Latent space: a VAE's encoding, its inverse, and the content-keyed cache."""

import pytest
import torch

from liftplace import latents


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny random AutoencoderKL (1 channel, downsampling 2x), saved as diffusers saves it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        layers_per_block=1, latent_channels=2, norm_num_groups=4, scaling_factor=0.5)
    out = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(out))
    return out


def load(vae_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=True, local_files_only=True).eval()


def images(n=6, seed=0):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_is_the_scaled_posterior_mean_and_decode_undoes_the_scale(vae_dir):
    vae = load(vae_dir)
    x = images()
    z = latents.encode(vae, x, batch=4)  # two chunks
    assert z.shape == (6, 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(z, vae.encode(x).latent_dist.mean * 0.5, atol=1e-6)
        assert torch.allclose(latents.decode(vae, z, batch=4), vae.decode(z / 0.5).sample.clamp(-1, 1), atol=1e-6)
    assert torch.equal(latents.encode(vae, x, batch=4), z)  # the mean, not a sample: the same every time


def test_the_cache_is_read_back_and_is_keyed_on_the_vae_and_the_data(vae_dir, tmp_path, monkeypatch):
    vae = load(vae_dir)
    x, y = images(), torch.arange(6)
    cache = tmp_path / "cache"
    said = []
    calls = {"n": 0}
    encode = latents.encode

    def counting(*args, **kwargs):
        calls["n"] += 1
        return encode(*args, **kwargs)

    monkeypatch.setattr(latents, "encode", counting)
    first = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    again = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    assert calls["n"] == 1 and torch.equal(first, again) and len(list(cache.iterdir())) == 1
    assert "encoded 6 images to (2, 8, 8)" in said[0] and len(said) == 1
    (path,) = cache.iterdir()
    # Another image, other labels, another VAE: encoded again, into another file.
    changed = x.clone()
    changed[3, 0, 5, 5] += 0.25
    latents.cached_encode(vae, vae_dir, changed, y, cache, log=said.append)
    latents.cached_encode(vae, vae_dir, x, y.flip(0), cache, log=said.append)
    other_dir = tmp_path / "vae2"
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(str(other_dir))
    moved = latents.cached_encode(vae, other_dir, x, y, cache, log=said.append)
    assert calls["n"] == 4 and len(list(cache.iterdir())) == 4 and not torch.allclose(moved, first)
    # A damaged cache file is encoded again and replaced, with a line saying so.
    path.write_bytes(path.read_bytes()[:100])
    vae = load(vae_dir)
    repaired = latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append)
    assert calls["n"] == 5 and torch.equal(repaired, first) and "cannot be read (" in said[-2] and said[-2].endswith("; encoding again")
    assert latents.cached_encode(vae, vae_dir, x, y, cache, log=said.append) is not None and calls["n"] == 5
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_vae_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="needs config.json and .safetensors weights"):
        latents.vae_fingerprint(tmp_path)
