"""Our vision tower (SDPA attention) against transformers' BlipVisionModel + vision_proj, fp32."""

import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval

from blipsearch.retrieval.models.blip_vision import BlipVisionTower, VisionTowerConfig


def test_features_and_embeddings_equal_transformers(tiny_model_dir):
    reference = BlipForImageTextRetrieval.from_pretrained(tiny_model_dir).eval()
    tower = BlipVisionTower(VisionTowerConfig.from_blip_config(reference.config.to_dict())).eval()
    tower.load_weights(dict(reference.state_dict()))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.vision_model(pixel_values=pixels).last_hidden_state
        expected_embeddings = F.normalize(reference.vision_proj(expected[:, 0]), dim=-1)
        features, embeddings = tower(pixels)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings, expected_embeddings, atol=1e-5, rtol=1e-5)
    assert features.std(dim=0).mean() > 0.05  # images differ: the comparison has teeth
