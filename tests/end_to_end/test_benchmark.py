"""`patchcore benchmark`: the seed's tables, and a clear error row for a backbone without weights."""

import json

import torch
import torchvision

from patchcore.cli import main


def test_benchmark_tables_with_missing_then_given_resnet18_weights(data_root, empty_torch_home, tmp_path, capsys):
    root = tmp_path / "mvtec_like"
    root.mkdir()
    (root / "battery_weld").symlink_to(data_root / "battery_weld")
    (root / "not_a_category").mkdir()
    out = tmp_path / "bench"
    assert main(["benchmark", str(root), "--backbone", "mobilenet_v2", "resnet18", "--out", str(out), "--quiet", "--coreset-ratio", "0.05"]) == 0
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["categories"] == ["battery_weld"]
    error = summary["results"]["resnet18"]["battery_weld"]["error"]
    assert error.startswith("no ImageNet weights for resnet18:")
    assert f"put resnet18-f37072fd.pth in {empty_torch_home / 'hub' / 'checkpoints'}" in error
    assert summary["tables"]["image_auroc"]["mobilenet_v2"]["battery_weld"] >= 0.95
    assert summary["tables"]["image_auroc"]["resnet18"] == {"Avg": None, "battery_weld": "error"}
    markdown = (out / "benchmark.md").read_text()
    for title in ("## Image AUROC", "## Pixel AUROC", "## Image F1 (best threshold on test"):
        assert title in markdown
    assert "| resnet18 | - | error |" in markdown
    assert "- resnet18: no ImageNet weights for resnet18" in markdown
    assert "Traceback" not in capsys.readouterr().err

    # Given a weights file (random weights saved on the spot), the same row runs.
    torch.manual_seed(0)
    weights = tmp_path / "resnet18-random.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out2 = tmp_path / "bench2"
    args = ["benchmark", str(root), "--backbone", "resnet18", "--weights", f"resnet18={weights}", "--out", str(out2), "--quiet", "--coreset-ratio", "0.05"]
    assert main(args) == 0
    cells = json.loads((out2 / "benchmark.json").read_text())["results"]["resnet18"]["battery_weld"]
    assert "error" not in cells
    assert 0.0 <= cells["image_auroc"] <= 1.0 and 0.0 <= cells["pixel_auroc"] <= 1.0
    assert cells["fit_seconds"] > 0
