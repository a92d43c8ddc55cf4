"""Model adapters, local loaders, tiny configs."""

import pytest
import timm
import torch
import torchvision
from diffusers import UNet2DModel

from fgds_engine.models import (
    Classifier,
    denoiser_output,
    load_scheduler,
    load_timm_classifier,
    load_unet,
    load_vae,
    tiny_models,
)


def test_timm_adapter_features_and_logits():
    m = timm.create_model("test_resnet", pretrained=False, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    clf = Classifier(m)
    logits, z = clf(x, with_features=True)
    assert clf.is_timm and clf.num_classes == 7 and clf.input_size is None
    assert torch.allclose(logits, m(x), atol=1e-5)
    assert torch.equal(z, m.forward_head(m.forward_features(x), pre_logits=True))


def test_torchvision_adapter_features_and_logits():
    m = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    clf = Classifier(m)
    logits, z = clf(x, with_features=True)
    assert not clf.is_timm and clf.num_classes == 5
    trunk = torch.nn.Sequential(*list(m.children())[:-1])
    assert torch.allclose(z, trunk(x).flatten(1), atol=1e-6)
    assert torch.equal(logits, m(x))
    assert torch.equal(clf(x), m(x))


def test_fixed_input_size_is_reported():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32, dynamic_img_size=False)
    assert Classifier(vit).input_size == (32, 32)
    tv = torchvision.models.vit_b_16(image_size=32, num_classes=3)
    assert Classifier(tv).input_size == (32, 32)


def test_no_head_is_a_clear_error():
    with pytest.raises(ValueError) as err:
        Classifier(torch.nn.Conv2d(3, 3, 1))
    assert str(err.value) == "cannot find the classifier head: the model has no nn.Linear layer"


def test_local_round_trip(tmp_path):
    m = tiny_models(num_classes=4)
    m.unet.save_pretrained(tmp_path / "unet")
    m.vae.save_pretrained(tmp_path / "vae")
    m.scheduler.save_pretrained(tmp_path / "scheduler")
    unet, vae = load_unet(tmp_path / "unet"), load_vae(tmp_path / "vae")
    sched = load_scheduler(tmp_path / "scheduler")
    x, t, pe = torch.randn(1, 4, 8, 8), torch.tensor(10), torch.randn(1, 5, 16)
    with torch.no_grad():
        assert torch.equal(denoiser_output(unet, x, t, pe), denoiser_output(m.unet, x, t, pe))
        assert torch.equal(vae.decode(x).sample, m.vae.decode(x).sample)
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}
    assert public(sched.config) == public(m.scheduler.config) and type(sched) is type(m.scheduler)
    from diffusers import DPMSolverMultistepScheduler  # the class the config names, not always DDIM

    DPMSolverMultistepScheduler.from_config(m.scheduler.config).save_pretrained(tmp_path / "dpm")
    assert type(load_scheduler(tmp_path / "dpm")) is DPMSolverMultistepScheduler
    torch.save(m.classifier.state_dict(), tmp_path / "clf.pt")
    clf = load_timm_classifier("test_vit", num_classes=4, checkpoint=tmp_path / "clf.pt",
                               img_size=16, patch_size=4, dynamic_img_size=False)
    want = m.classifier.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in clf.state_dict().items())


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_unet(tmp_path / "nope")
    want = f"UNet folder not found: {tmp_path / 'nope'} (models load from local folders only)"
    assert str(err.value) == want


def test_unet2dmodel_contract():
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, norm_num_groups=4, num_class_embeds=5,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(denoiser_output(unet, x, torch.tensor(3), None, torch.tensor([1, 4])),
                           unet(x, 3, class_labels=torch.tensor([1, 4])).sample)


def test_open_clip_embedder_from_local_checkpoint(tmp_path):
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    from fgds_engine.models import load_open_clip_embedder

    _MODEL_CONFIGS["fgds-tiny-clip"] = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    torch.manual_seed(0)
    model = open_clip.create_model("fgds-tiny-clip").eval()
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    loaded, preprocess = load_open_clip_embedder("fgds-tiny-clip", tmp_path / "clip.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    assert callable(preprocess)
    with pytest.raises(FileNotFoundError, match="open_clip checkpoint not found"):
        load_open_clip_embedder("fgds-tiny-clip", tmp_path / "missing.pt")
