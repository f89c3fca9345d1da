"""The solo-learn glue counts ``devices`` as Lightning does (an int, a list of ids, or a string),
checked against a real Lightning Trainer where the CPU can build one; no solo-learn needed."""

import pytest
from omegaconf import OmegaConf  # noqa: E402  # hydra-core's, a required test dependency

from smooth_infonce.integrations.solo.optimizer_cfg import devices_per_node, total_batch  # noqa: E402


@pytest.mark.parametrize("devices", [1, 2, 3, "1", "2", " 2 ", "auto"])
@pytest.mark.parametrize("num_nodes", [1, 2])
def test_cpu_world_size_is_lightnings(devices, num_nodes):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    cfg = OmegaConf.create(dict(devices=devices, num_nodes=num_nodes, accelerator="cpu",
                                optimizer=dict(batch_size=16)))
    assert devices_per_node(devices, "cpu") * num_nodes == trainer.world_size
    assert total_batch(cfg) == 16 * trainer.world_size


@pytest.mark.parametrize("devices, count", [([0], 1), ([0, 1, 3], 3), ("0,1", 2), ("0,", 1), ("1,2,3", 3)])
def test_device_ids_count_once_each(devices, count):
    cfg = OmegaConf.create(dict(devices=devices, accelerator="gpu", optimizer=dict(batch_size=8)))
    assert devices_per_node(cfg.devices, "gpu") == count and total_batch(cfg) == 8 * count  # ListConfig too


@pytest.mark.parametrize("devices", [0, -2, "zero", "", True])
def test_bad_devices_name_the_value(devices):
    with pytest.raises((ValueError, TypeError), match="devices"):
        devices_per_node(devices, "cpu")
