"""Tests of WikiText loading (Transformer-XL vocabulary) and LM batching."""
import json
from unittest import mock

import numpy as np
import pytest

from jreg import data
from jreg.data import wikitext


@pytest.fixture(scope='module')
def wikitext2(shared_data):
  return data.load_wikitext('wikitext-2', data_dir=str(shared_data))


def _write_corpus(folder, train, valid='a b\n', test='b a\n'):
  folder.mkdir(parents=True, exist_ok=True)
  for split, text in (('train', train), ('valid', valid), ('test', test)):
    (folder / f'wiki.{split}.tokens').write_text(text, encoding='utf-8')
  return folder


@pytest.mark.shared_data
def test_wikitext2_counts_and_vocabulary(wikitext2, shared_data):
  vocabulary = wikitext2.vocabulary
  assert len(vocabulary) == 33278
  assert {split: len(tokens) for split, tokens in wikitext2.splits.items()} == {
      'train': 2088628, 'valid': 217646, 'test': 245569}
  assert all(tokens.dtype == np.int32 for tokens in wikitext2.splits.values())
  assert vocabulary.symbols[:2] == ['<eos>', 'the'] and vocabulary.eos_id == 0
  with open(shared_data / 'wikitext-2' / 'wiki.train.tokens',
            encoding='utf-8') as stream:
    lines = stream.readlines()
  assert int((wikitext2.train == 0).sum()) == len(lines)  # one <eos> a line
  first = lines[1].split() + ['<eos>']  # line 0 is blank
  start = 1
  assert vocabulary.decode(wikitext2.train[start:start + len(first)]) == first


def test_vocabulary_order_follows_transformer_xl(tmp_path):
  """<eos> first, then decreasing training count, ties by first appearance."""
  folder = _write_corpus(tmp_path / 'wikitext-2',
                         train=' b a c\n\n c  a d\t\n b\n',
                         valid='d a\n', test='c\n')
  corpus = data.load_wikitext('wikitext-2', data_dir=str(tmp_path))
  # counts: b 2, a 2, c 2, d 1 (first appearances b, a, c, d); no <unk>.
  assert corpus.vocabulary.symbols == ['<eos>', 'b', 'a', 'c', 'd']
  np.testing.assert_array_equal(corpus.train,
                                [1, 2, 3, 0, 0, 3, 2, 4, 0, 1, 0])
  np.testing.assert_array_equal(corpus.valid, [4, 2, 0])
  np.testing.assert_array_equal(corpus.test, [3, 0])
  _write_corpus(folder, train='a b\n', valid='a e\n')
  with pytest.raises(data.DataError, match="wiki.valid.tokens holds a symbol 'e'"):
    data.load_wikitext('wikitext-2', data_dir=str(folder))
  # A training file without tokens (empty or blank lines) is named, not the
  # validation file whose symbols it cannot know.
  for train in ('', '\n \n\t\n'):
    _write_corpus(folder, train=train, valid='a e\n')
    with pytest.raises(data.DataError,
                       match='wiki.train.tokens (has no lines|holds no tokens)'):
      data.load_wikitext('wikitext-2', data_dir=str(folder))
  # With <unk> in the vocabulary, unseen symbols map to it.
  _write_corpus(folder, train='<unk> x x\n', valid='y x\n')
  corpus = data.load_wikitext('wikitext-2', data_dir=str(folder))
  assert corpus.vocabulary.symbols == ['<eos>', 'x', '<unk>']
  np.testing.assert_array_equal(corpus.valid, [2, 1, 0])


def test_vocabulary_saved_as_json_and_cache(tmp_path):
  _write_corpus(tmp_path / 'data' / 'wikitext-103', train='z y z\nw\n',
                valid='y\n', test='w z\n')
  cache = tmp_path / 'cache'
  corpus = data.load_wikitext('wikitext-103', data_dir=str(tmp_path / 'data'),
                              cache_dir=str(cache))
  saved = json.loads((cache / 'wikitext-103' / 'vocabulary.json').read_text())
  assert saved['symbols'] == ['<eos>', 'z', 'y', 'w']
  path = tmp_path / 'vocabulary.json'
  corpus.vocabulary.save(str(path))
  assert data.Vocabulary.load(str(path)).symbols == corpus.vocabulary.symbols
  # The cache is read back even when the source files are gone.
  for split in wikitext.SPLITS:
    (tmp_path / 'data' / 'wikitext-103' / f'wiki.{split}.tokens').unlink()
  cached = data.load_wikitext('wikitext-103', data_dir=str(tmp_path / 'data'),
                              cache_dir=str(cache))
  assert cached.vocabulary.symbols == corpus.vocabulary.symbols
  for split in wikitext.SPLITS:
    np.testing.assert_array_equal(cached.splits[split], corpus.splits[split])


def test_lm_batches_are_shifted_contiguous_rows():
  stream = np.arange(1000, dtype=np.int32) * 7 % 101
  iterator = data.LMOrderedIterator(stream, 4, 9, process_index=0,
                                    process_count=1)
  row_length = 1000 // 4
  assert iterator.steps_per_epoch == (row_length - 1) // 9
  rows = stream[:4 * row_length].reshape(4, row_length)
  for i in range(iterator.steps_per_epoch):
    batch = next(iterator)
    assert batch['inputs'].shape == (4, 9) and batch['inputs'].dtype == np.int32
    np.testing.assert_array_equal(batch['inputs'], rows[:, i * 9:i * 9 + 9])
    np.testing.assert_array_equal(batch['targets'],
                                  rows[:, i * 9 + 1:i * 9 + 10])
  # The next epoch starts again at the beginning of the rows (no shuffling).
  np.testing.assert_array_equal(next(iterator)['inputs'], rows[:, :9])


def test_lm_sharding_restore_and_eval():
  stream = np.random.default_rng(0).integers(0, 50, 333).astype(np.int32)
  whole = data.LMOrderedIterator(stream, 4, 8, process_index=0,
                                 process_count=1)
  halves = [data.LMOrderedIterator(stream, 4, 8, process_index=p,
                                   process_count=2) for p in (0, 1)]
  for _ in range(12):  # 10 batches per epoch: crosses the epoch boundary
    batch = next(whole)
    parts = [next(half) for half in halves]
    for key in ('inputs', 'targets'):
      np.testing.assert_array_equal(
          batch[key], np.concatenate([part[key] for part in parts]))
  state = json.loads(json.dumps(halves[1].get_state()))
  expected = [next(halves[1]) for _ in range(10)]
  restored = data.LMOrderedIterator(stream, 4, 8, process_index=1,
                                    process_count=2)
  restored.set_state(state)
  for batch, reference in zip([next(restored) for _ in range(10)], expected):
    np.testing.assert_array_equal(batch['inputs'], reference['inputs'])
    np.testing.assert_array_equal(batch['targets'], reference['targets'])
  # Eval: every target of the trimmed rows is scored exactly once.
  evaluation = data.LMOrderedIterator(stream, 4, 8, mode='eval',
                                      process_index=0, process_count=1)
  batches = list(evaluation)
  assert len(batches) == len(evaluation) == 11  # ceil((83 - 1) / 8)
  targets = np.concatenate([b['targets'][b['mask']].reshape(4, -1)
                            for b in batches], axis=1)
  np.testing.assert_array_equal(targets,
                                stream[:332].reshape(4, 83)[:, 1:])
  assert batches[-1]['inputs'].shape == (4, 8)
  assert batches[-1]['mask'].sum() == 4 * 2


@pytest.mark.shared_data
def test_wikitext_iterator_on_shared_data(wikitext2):
  iterator = data.wikitext_iterator(wikitext2, 'train', 8, 70,
                                    process_index=0, process_count=1)
  batch = next(iterator)
  assert batch['inputs'].shape == (8, 70) and batch['targets'].dtype == np.int32
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert len(iterator) == (2088628 // 8 - 1) // 70


def test_wikitext_tfds_source_takes_the_download_path(tmp_path):
  """tfds has no WikiText builder: source='tfds' downloads the official archive."""
  with mock.patch('jreg.data.download.download',
                  return_value=_write_corpus(tmp_path / 'wikitext-2',
                                             train='q r q\n', valid='r\n',
                                             test='q\n')) as download:
    corpus = data.load_wikitext('wikitext-2', source='tfds',
                                data_dir=str(tmp_path))
  download.assert_called_once_with('wikitext-2', data_dir=str(tmp_path),
                                   mirror=None)
  assert corpus.vocabulary.symbols == ['<eos>', 'q', 'r']
