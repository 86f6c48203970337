"""WikiText-103 / WikiText-2 word-level language modelling.

Files (Merity et al. 2017, https://wikitext.smerity.com/): the tokenised v1
releases `wiki.{train,valid,test}.tokens`, one paragraph or heading per line,
tokens separated by spaces, rare words already replaced by `<unk>`.

Vocabulary and encoding follow Transformer-XL's `Vocab`/`Corpus` for 'wt103'
and 'wt2' (Dai et al. 2019, `pytorch/utils/vocabulary.py`, `data_utils.py`),
which the DEQ code (locuslab/deq, DEQ-Sequence) copies:
- a line is `line.strip().split()` (whitespace, case kept), and `<eos>` is
  appended to every line, blank lines included;
- the vocabulary is `['<eos>']` (the one special symbol, id 0) followed by
  every symbol of the *training* split ordered by decreasing count, ties in
  order of first appearance (`collections.Counter.most_common`), with no
  minimum count and no size limit (`<unk>` is an ordinary, counted symbol);
- every split is encoded as one stream of ids.
Both variants count the training split only, Transformer-XL's 'wt103' rule
(its 'wt2' setting also counts valid and test: on WikiText-2 that gives the
same 33,278 symbols, every valid/test token occurring in train, in another
order). WikiText-2 stands in here for WikiText-103, so it takes the same path.

WikiText-2: 2,088,628 / 217,646 / 245,569 tokens, vocabulary 33,278.

Batching follows Transformer-XL's `LMOrderedIterator`: the stream of N tokens
is trimmed to a multiple of the global batch size G and cut into G contiguous
rows, `rows = stream[:N // G * G].reshape(G, N // G)` (row r is the r-th
contiguous chunk); batch i is `inputs = rows[:, i*T:(i+1)*T]`,
`targets = rows[:, i*T+1:(i+1)*T+1]`.
"""
import array
import collections
import json
import pathlib
import time
from typing import Iterable, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from jreg.data import common

VARIANTS = ('wikitext-103', 'wikitext-2')
SPLITS = ('train', 'valid', 'test')
EOS = '<eos>'
UNK = '<unk>'
_VOCABULARY_FORMAT = 'jreg-vocabulary-v1'


def _how_to_get(variant: str):
  def how(directory: pathlib.Path) -> str:
    from jreg.data import download  # pylint: disable=g-import-not-at-top
    return (f"use source='auto' or 'download' (or `python -m "
            f"jreg.data.download {variant}`) to download and verify it, or "
            f'download {download.DATASETS[variant].files[0].url} and extract '
            'the wiki.*.tokens files '
            f'into {directory}')
  return how


def _lines(path: pathlib.Path, how_to_get: str) -> Iterable[list[str]]:
  """Yields the tokens of each line followed by `<eos>` (Transformer-XL)."""
  common.require_file(path, how_to_get)
  count = 0
  with open(path, 'r', encoding='utf-8') as stream:
    try:
      for line in stream:
        count += 1
        yield line.strip().split() + [EOS]
    except UnicodeDecodeError as error:
      raise common.DataError(
          f'{path} is not UTF-8 text ({error.reason}): {how_to_get}.'
      ) from None
  if count == 0:
    raise common.DataError(f'{path} has no lines (empty token file): '
                           f'{how_to_get}.')


class Vocabulary:
  """Symbols <-> ids; saved as JSON text.

  Attributes:
    symbols: the symbols in id order.
  """

  def __init__(self, symbols: Sequence[str]):
    self.symbols = list(symbols)
    self._ids = {symbol: index for index, symbol in enumerate(self.symbols)}
    if len(self._ids) != len(self.symbols):
      raise ValueError('vocabulary symbols are not unique.')

  @classmethod
  def from_counts(cls, counts: collections.Counter,
                  specials: Sequence[str] = (EOS,)) -> 'Vocabulary':
    """Specials first, then symbols by decreasing count (Transformer-XL)."""
    symbols = list(specials)
    seen = set(symbols)
    for symbol, _ in counts.most_common():
      if symbol not in seen:
        symbols.append(symbol)
        seen.add(symbol)
    return cls(symbols)

  def __len__(self) -> int:
    return len(self.symbols)

  def __contains__(self, symbol: str) -> bool:
    return symbol in self._ids

  def id(self, symbol: str) -> int:
    return self._ids[symbol]

  @property
  def eos_id(self) -> int:
    return self._ids[EOS]

  def encode(self, symbols: Sequence[str]) -> list[int]:
    """Ids of `symbols`; unknown symbols map to `<unk>` when it exists."""
    unk = self._ids.get(UNK)
    try:
      return [self._ids[symbol] for symbol in symbols]
    except KeyError:
      if unk is None:
        missing = next(s for s in symbols if s not in self._ids)
        raise KeyError(f'symbol {missing!r} that is not in the vocabulary, '
                       'which has no <unk>') from None
      return [self._ids.get(symbol, unk) for symbol in symbols]

  def decode(self, ids: Iterable[int]) -> list[str]:
    return [self.symbols[int(index)] for index in ids]

  def to_json(self) -> str:
    return json.dumps({'format': _VOCABULARY_FORMAT, 'symbols': self.symbols},
                      ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str) -> 'Vocabulary':
    content = json.loads(text)
    if content.get('format') != _VOCABULARY_FORMAT:
      raise ValueError(f'not a {_VOCABULARY_FORMAT} vocabulary file.')
    return cls(content['symbols'])

  def save(self, path: str) -> None:
    pathlib.Path(path).write_text(self.to_json(), encoding='utf-8')

  @classmethod
  def load(cls, path: str) -> 'Vocabulary':
    return cls.from_json(pathlib.Path(path).read_text(encoding='utf-8'))


class WikiTextCorpus:
  """A vocabulary and the three encoded splits (int32 [N] streams each)."""

  def __init__(self, vocabulary: Vocabulary, splits: Mapping[str, np.ndarray]):
    self.vocabulary = vocabulary
    self.splits = dict(splits)

  @property
  def train(self) -> np.ndarray:
    return self.splits['train']

  @property
  def valid(self) -> np.ndarray:
    return self.splits['valid']

  @property
  def test(self) -> np.ndarray:
    return self.splits['test']


def _wikitext_folder(variant: str, source: str, data_dir: Optional[str],
                     mirror: Optional[str]) -> pathlib.Path:
  """The folder holding `wiki.*.tokens`.

  tensorflow-datasets has no WikiText builder; `source='tfds'` (which used
  its download manager for the official archive) now takes the 'download'
  path, which fetches the same archive and checks its digest.
  """
  if source == 'tfds':
    source = 'download'
  return common.resolve_dataset_dir(variant, source, data_dir, (variant,),
                                    'wiki.train.tokens', _how_to_get(variant),
                                    mirror)


def load_wikitext(variant: str = 'wikitext-103', *,
                  source: str = common.DEFAULT_SOURCE,
                  data_dir: Optional[str] = None,
                  cache_dir: Optional[str] = None,
                  mirror: Optional[str] = None) -> WikiTextCorpus:
  """Reads, builds the training vocabulary, and encodes all three splits.

  Args:
    variant: 'wikitext-103' or 'wikitext-2' (same format).
    source: 'auto', 'local' or 'download' (`wiki.*.tokens` under
      `data_dir/<variant>/` or `data_dir/`; see `jreg.data.common`); 'tfds'
      is taken as 'download' (tensorflow-datasets has no WikiText builder).
    data_dir: see `source`; None means `common.default_data_dir()`.
    cache_dir: if given, the vocabulary (JSON) and the encoded splits (.npy)
      are saved there on first use and read back afterwards.
    mirror: download mirror base URL (default `$JREG_DATA_MIRROR`).

  Returns:
    The corpus.
  """
  common.check_source(source)
  if variant not in VARIANTS:
    raise ValueError(f'WikiText variant {variant!r} is not one of {VARIANTS}.')
  cache = pathlib.Path(cache_dir) / variant if cache_dir else None
  if cache is not None and (cache / 'vocabulary.json').is_file():
    vocabulary = Vocabulary.load(cache / 'vocabulary.json')
    return WikiTextCorpus(vocabulary, {
        split: np.load(cache / f'{split}.npy', allow_pickle=False)
        for split in SPLITS})
  folder = _wikitext_folder(variant, source, data_dir, mirror)
  how = _how_to_get(variant)(folder)
  paths = {split: folder / f'wiki.{split}.tokens' for split in SPLITS}
  for path in paths.values():
    common.require_file(path, how)
  start = time.perf_counter()
  counts = collections.Counter()
  for symbols in _lines(paths['train'], how):
    counts.update(symbols[:-1])  # Transformer-XL counts without <eos>
  if not counts:
    raise common.DataError(
        f'{paths["train"]} holds no tokens (an empty or blank training file, '
        f'from which no vocabulary can be built): {how}.')
  vocabulary = Vocabulary.from_counts(counts)
  logging.info('%s: vocabulary of %d symbols from %s (%.1f s)', variant,
               len(vocabulary), paths['train'], time.perf_counter() - start)
  splits = {}
  for split, path in paths.items():
    ids = array.array('i')
    for symbols in _lines(path, how):
      try:
        ids.extend(vocabulary.encode(symbols))
      except KeyError as error:
        raise common.DataError(
            f'{path} holds a {error.args[0]} (the vocabulary is built from '
            f'{paths["train"].name}: a truncated {paths["train"].name}, or files '
            f'from different releases?): {how}.') from None
    splits[split] = np.frombuffer(ids, np.int32).copy()
    logging.info('%s: encoded %s, %d tokens (%.1f s)', variant, split,
                 len(splits[split]), time.perf_counter() - start)
  if cache is not None:
    cache.mkdir(parents=True, exist_ok=True)
    for split, tokens in splits.items():
      np.save(cache / f'{split}.npy', tokens, allow_pickle=False)
    vocabulary.save(cache / 'vocabulary.json')
  return WikiTextCorpus(vocabulary, splits)


class LMOrderedIterator(common.EpochStepPosition):
  """Ordered [B, T] language-modelling batches with shifted targets.

  Transformer-XL's `LMOrderedIterator` (see module docstring), sharded by
  rows: process p of P takes rows [p*G/P, (p+1)*G/P) of the G global rows.
  The stream is not shuffled (the rows are read in order so that recurrent
  memory carries across consecutive batches), as in Transformer-XL and DEQ.

  - 'train' mode: only full windows, `(L - 1) // T` batches per epoch
    (L = N // G tokens per row); epochs repeat the same order, endlessly
    unless `num_epochs` is given.
  - 'eval' mode: one pass, `ceil((L - 1) / T)` batches; the last one is
    padded to T columns with id 0 and `'mask'` (bool [B, T]) marks the real
    targets, so every target position of the trimmed stream is scored once.

  Yields `{'inputs': int32 [B, T], 'targets': int32 [B, T]}` (+ `'mask'`).
  """
  _IDENTITY = ('mode', 'num_tokens', 'seq_len', 'global_batch_size')


  def __init__(self, tokens: np.ndarray, global_batch_size: int, seq_len: int,
               *, mode: str = 'train', process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               num_epochs: Optional[int] = None):
    process_index, process_count = common.resolve_batch_sharding(
        mode, global_batch_size, process_index, process_count)
    row_length = len(tokens) // global_batch_size
    if seq_len < 1 or row_length < seq_len + 1:
      raise ValueError(
          f'{len(tokens)} tokens in {global_batch_size} rows give rows of '
          f'{row_length} tokens, too short for seq_len={seq_len}.')
    rows = np.asarray(tokens[:row_length * global_batch_size], np.int32)
    rows = rows.reshape(global_batch_size, row_length)     # [G, L]
    batch_size = global_batch_size // process_count
    start = process_index * batch_size
    self._rows = rows[start:start + batch_size]             # [B, L]
    self._num_tokens = int(len(tokens))
    self._global_batch_size = global_batch_size
    self._seq_len = seq_len
    self._mode = mode
    self._num_epochs = num_epochs
    self._epoch = 0
    self._step = 0

  @property
  def steps_per_epoch(self) -> int:
    targets_per_row = self._rows.shape[1] - 1
    if self._mode == 'train':
      return targets_per_row // self._seq_len
    return -(-targets_per_row // self._seq_len)

  def __len__(self) -> int:
    return self.steps_per_epoch

  def __iter__(self) -> 'LMOrderedIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._step >= self.steps_per_epoch:
      if self._mode == 'eval':
        raise StopIteration
      self._epoch += 1
      self._step = 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    begin = self._step * self._seq_len
    width = min(self._seq_len, self._rows.shape[1] - 1 - begin)
    inputs = self._rows[:, begin:begin + width]              # [B, width]
    targets = self._rows[:, begin + 1:begin + 1 + width]     # [B, width]
    self._step += 1
    if self._mode == 'train':
      return {'inputs': inputs.copy(), 'targets': targets.copy()}
    pad = ((0, 0), (0, self._seq_len - width))
    mask = np.zeros(self._rows.shape[0:1] + (self._seq_len,), bool)
    mask[:, :width] = True
    return {'inputs': np.pad(inputs, pad), 'targets': np.pad(targets, pad),
            'mask': mask}


def wikitext_iterator(corpus: WikiTextCorpus, split: str,
                      global_batch_size: int, seq_len: int, *,
                      mode: str = 'train', process_index: Optional[int] = None,
                      process_count: Optional[int] = None,
                      num_epochs: Optional[int] = None) -> LMOrderedIterator:
  """`LMOrderedIterator` over one split of a loaded corpus.

  Args:
    corpus: from `load_wikitext`.
    split: 'train', 'valid' or 'test'.
    global_batch_size: rows G over all processes.
    seq_len: T, tokens per row per batch.
    mode, process_index, process_count, num_epochs: see `LMOrderedIterator`.
  """
  if split not in SPLITS:
    raise ValueError(f'WikiText split {split!r} is not one of {SPLITS}.')
  return LMOrderedIterator(corpus.splits[split], global_batch_size, seq_len,
                           mode=mode, process_index=process_index,
                           process_count=process_count, num_epochs=num_epochs)
