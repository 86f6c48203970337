"""The data benchmark runs on a tiny configuration and reports every pipeline."""
import json

import pytest

from experiments import bench_data


def test_bench_data_tiny(shared_data, tmp_path):
  config = dict(bench_data.quickstart_config(), data_dir=str(shared_data),
                pipelines=['mnist', 'synthetic_1d', 'imagenet_mini_w0',
                           'wikitext2'], steps=2, batch_size=32,
                imagenet_image_size=16)
  results = bench_data.run(config, str(tmp_path))
  assert set(results['pipelines']) == set(config['pipelines'])
  for entry in results['pipelines'].values():
    assert entry['examples_per_second'] > 0
  assert results['pipelines']['wikitext2']['tokens_per_second'] == pytest.approx(
      results['pipelines']['wikitext2']['examples_per_second'] * 70)
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['pipelines'].keys() == results['pipelines'].keys()


def test_bench_data_rejects_unknown_pipeline():
  with pytest.raises(ValueError, match='pipelines'):
    bench_data.run(dict(pipelines=['svhn']))
