"""Checkpoint I/O: safe loading, the layouts of our and the original release's files, clear errors."""
import argparse
import os
import pickle

import pytest
import torch

import models  # noqa: F401  (registers the models)
from utils import CheckpointError, extract_state_dict, load_checkpoint_file, load_model_weights


class _WritesMarker:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_original_release_layouts_load(tmp_path):
    model = models.create_model('kw_resnet18', num_classes=4)
    state = model.state_dict()
    layouts = {
        'ours.pth': {'model': state, 'epoch': 3, 'args': argparse.Namespace(model='kw_resnet18', lr=4e-3)},
        'bare.pth': state,
        'state_dict.pth': {'state_dict': state},
        'ema_only.pth': {'model_ema': state},
        'ddp.pth': {'model': {f'module.{k}': v for k, v in state.items()}},
    }
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        loaded = extract_state_dict(load_checkpoint_file(tmp_path / name))
        assert list(loaded) == list(state), name
        load_model_weights(models.create_model('kw_resnet18', num_classes=4), loaded, source=name)


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / 'marker'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': _WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match='needs arbitrary code to unpickle.*--trust_checkpoint true'):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    torch.save({'model': models.create_model('resnet18', num_classes=2).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(path)
    with pytest.raises(CheckpointError, match='does not exist'):
        load_checkpoint_file(tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        load_checkpoint_file(tmp_path / 'junk.pth')
    torch.save([1, 2, 3], tmp_path / 'list.pth')
    with pytest.raises(CheckpointError, match='holds no model weights'):
        extract_state_dict(load_checkpoint_file(tmp_path / 'list.pth'))


def test_checkpoint_of_another_model_names_keys():
    state = models.create_model('kw_resnet18', num_classes=4, cell_num_ratio=2).state_dict()
    with pytest.raises(CheckpointError, match=r'42 wrong shape \(checkpoint vs model\): warehouse_manager.weights.0 '
                                              r'\(112, 64, 64, 1, 1\) vs \(56, 64, 64, 1, 1\)'):
        load_model_weights(models.create_model('kw_resnet18', num_classes=4), state)
    with pytest.raises(CheckpointError, match=r'missing: .*; \d+ unexpected: '):
        load_model_weights(models.create_model('resnet18', num_classes=4), state)


def test_numpy_scalars_of_original_optimizer_states_load(tmp_path):
    import numpy as np
    torch.save({'model': {'w': torch.ones(1)}, 'optimizer': {'param_groups': [{'lr': np.float64(4e-3)}]},
                'epoch': np.int64(3)}, tmp_path / 'ckpt.pth')
    loaded = load_checkpoint_file(tmp_path / 'ckpt.pth')
    assert loaded['optimizer']['param_groups'][0]['lr'] == 4e-3 and loaded['epoch'] == 3
