"""`load_full_state_dict`: full weights (a dict, a Lightning .ckpt, a torch file, a .safetensors file) loaded into a
model partitioned in `configure_model` at stage 3 on 2 processes, and the key/shape/path errors."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from helpers import RandomDataset, Regressor, cpu_trainer, make_net
from lightning_zero import ZeroStrategy, load_full_state_dict

SOURCES = ("dict", "pt", "safetensors", "ckpt")


class Pretrained(L.LightningModule):
    """Builds one net per source in configure_model (partitioned), loads each, and checks the error report."""

    def __init__(self, sources, folder):
        super().__init__()
        self.sources, self.folder = sources, folder

    def configure_model(self):
        self.nets = nn.ModuleDict({name: make_net(seed=123) for name in self.sources})  # not the source's init
        for name, (source, prefix) in self.sources.items():
            assert load_full_state_dict(self.nets[name], source, prefix=prefix) == ([], [])
        # A mismatch: strict raises before loading (on every rank alike), non-strict returns the lists.
        dict_source = self.sources["dict"][0]
        bad = {k.replace("4.", "9."): v for k, v in dict_source.items()}
        report = {}
        try:
            load_full_state_dict(self.nets["dict"], bad)
        except ValueError as err:
            report["strict"] = str(err)
        report["lenient"] = load_full_state_dict(self.nets["dict"], bad, strict=False)
        torch.save(report, f"{self.folder}/report_{self.global_rank}.pt")

    def predict_step(self, batch, batch_idx):
        x, _ = batch
        return torch.stack([self.nets[name](x) for name in self.sources])

    def predict_dataloader(self):
        return DataLoader(RandomDataset(16), batch_size=4)


class SavePredictions(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_predict_start(self, trainer, pl_module):
        assert all(p.numel() == 0 and p.ds_tensor.numel() > 0 for p in pl_module.parameters()), "not partitioned"

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        torch.save((batch[0], outputs), f"{self.folder}/pred_{trainer.global_rank}_{batch_idx}.pt")


def _lightning_ckpt(path):
    """A real Lightning checkpoint (one training step on one process); returns its `net` weights."""
    model = Regressor(n=8)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model)
    trainer.save_checkpoint(path)
    return {k: v.clone() for k, v in model.net.state_dict().items()}


@pytest.mark.distributed
def test_full_weights_from_every_format_reproduce_predictions(tmp_path):
    from safetensors.torch import save_file

    source = make_net(seed=1).state_dict()
    torch.save(source, tmp_path / "w.pt")
    save_file(source, str(tmp_path / "w.safetensors"))
    ckpt_weights = _lightning_ckpt(tmp_path / "w.ckpt")
    sources = {"dict": (source, ""), "pt": (str(tmp_path / "w.pt"), ""),
               "safetensors": (str(tmp_path / "w.safetensors"), ""), "ckpt": (str(tmp_path / "w.ckpt"), "net.")}
    trainer = cpu_trainer(strategy=ZeroStrategy(stage=3, start_method="spawn"),
                          callbacks=[SavePredictions(str(tmp_path))])
    trainer.predict(Pretrained(sources, str(tmp_path)), return_predictions=False)

    references = {name: make_net() for name in SOURCES}
    for name, net in references.items():
        net.load_state_dict(ckpt_weights if name == "ckpt" else source)
    files = sorted(tmp_path.glob("pred_*.pt"))
    assert len(files) == 4  # 16 samples, 2 ranks, batch 4
    with torch.no_grad():
        for f in files:
            x, y = torch.load(f)
            for i, name in enumerate(SOURCES):
                assert torch.equal(y[i], references[name](x)), name
    for rank in (0, 1):
        report = torch.load(tmp_path / f"report_{rank}.pt")
        assert report["strict"].startswith("The checkpoint does not match the model: 2 missing key(s): 4.bias,"
                                           " 4.weight; 2 unexpected key(s): 9.bias, 9.weight.")
        assert "strict=False" in report["strict"]
        assert report["lenient"] == (["4.bias", "4.weight"], ["9.bias", "9.weight"])


# ---------------------------------------------------------------------------------------------------------------------
# One process, no partitioning: the path handling and the messages
# ---------------------------------------------------------------------------------------------------------------------


def test_shape_mismatch_raises_before_loading():
    net = make_net(seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bad = dict(make_net(seed=1).state_dict(), **{"2.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"1 shape mismatch\(es\).*\n  2\.weight: the weights have \[3, 3\], the model"
                                         r" \[16, 16\]"):
        load_full_state_dict(net, bad, strict=False)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was loaded


def test_prefix_and_lightning_dict():
    net = make_net(seed=0)
    weights = make_net(seed=1).state_dict()
    ckpt = {"state_dict": {f"net.{k}": v for k, v in weights.items()}, "epoch": 3}
    assert load_full_state_dict(net, ckpt, prefix="net.") == ([], [])
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())


def test_safetensors_folder_of_shards(tmp_path):
    from safetensors.torch import save_file

    weights = make_net(seed=1).state_dict()
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[:3]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: weights[k] for k in keys[3:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    net = make_net(seed=0)
    assert load_full_state_dict(net, tmp_path) == ([], [])
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())


def test_path_errors(tmp_path):
    net = make_net()
    with pytest.raises(TypeError, match="takes a state dict or a path; got an object of type int"):
        load_full_state_dict(net, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_full_state_dict(net, tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="is a folder without .safetensors files"):
        load_full_state_dict(net, tmp_path)
    (tmp_path / "run.ckpt").mkdir()
    (tmp_path / "run.ckpt" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="is a sharded ZeroStrategy checkpoint folder.*lightning-zero consolidate"):
        load_full_state_dict(net, tmp_path / "run.ckpt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(TypeError, match="holds a list, not a state dict"):
        load_full_state_dict(net, tmp_path / "list.pt")
    torch.save({"w": nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"weights_only=True\) refused the file.*If you trust it"):
        load_full_state_dict(net, tmp_path / "pickled.pt")


def test_missing_safetensors_names_the_install(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "w.safetensors").write_bytes(b"")
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_full_state_dict(make_net(), tmp_path / "w.safetensors")
