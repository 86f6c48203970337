"""DEQ-Transformer with Jacobian regularisation on WikiText (experiments/deq_wikitext.py).

`paper`: Bai, Koltun & Kolter, ICML 2021, Sec. 5.2, Appendix A, Tables 3-4 and
the reference script for the rest: the 98M-parameter DEQ-Transformer on
WikiText-103, Adam 2.5e-4 with linear warm-up then cosine decay, gradient
clipping 0.25, batch 60 x 150 tokens, memory of 300 positions, Anderson
forward / Broyden backward with 12 / 12 NFE, 32,000 unrolled pre-training
steps, the Jacobian term on p = 0.35 of the steps with gamma raised from 1.6
to 2.5 in steps of 0.1.
`small`: a CPU-sized DEQ-Transformer on WikiText-2 (benchmarks, reduced runs).
`quickstart`: 12 steps of a tiny one on WikiText-2.
"""
import ml_collections

from experiments import configs

WIKITEXT103_TRAIN_TOKENS = 103_227_021


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  """The config at `preset` ('paper' | 'small' | 'quickstart')."""
  configs.check_preset(preset)
  config = configs.base(log_every=200, eval_every=5_000, checkpoint_every=5_000)
  config.batch_size = 60           # global number of token streams
  config.eval_batch_size = 16
  config.num_steps = 300_000
  config.learning_rate = 2.5e-4    # Adam peak
  config.optimizer = configs.optimizer(
      'adam', schedule='warmup_cosine',
      # one epoch of WikiText-103 at 60 x 150 tokens
      warmup_steps=WIKITEXT103_TRAIN_TOKENS // (60 * 150),
      grad_clip=0.25)              # global-norm clipping (reference --clip)
  config.eval_max_batches = 0      # periodic evaluations read this many
                                   # batches (0: the whole validation split)
  config.final_eval_whole_split = True  # the reported perplexity reads it all
  config.data = configs.data(
      name='wikitext-103',         # 'wikitext-103' | 'wikitext-2'
      seq_len=150,                 # T, tokens per training segment
      eval_seq_len=150)            # tokens per evaluation segment
  config.model = ml_collections.ConfigDict()
  config.model.architecture = 'deq'   # 'deq' | 'transformer_xl' (explicit, untied)
  config.model.d_model = 700          # D
  config.model.n_head = 10
  config.model.d_head = 70
  config.model.d_inner = 48_000       # feed-forward width F
  config.model.cutoffs = (20_000, 40_000, 200_000)  # adaptive softmax clusters
  config.model.div_val = 4            # embedding width divisor per cluster
  config.model.dropout = 0.06
  config.model.dropatt = 0.01         # attention dropout
  config.model.pre_lnorm = False
  config.model.weight_norm = True
  config.model.mem_len = 300          # memory positions carried across segments
  config.model.n_layer = 16           # explicit stack depth (transformer_xl)
  config.model.init_std = 0.01
  config.model.proj_init_std = 0.01
  config.deq = ml_collections.ConfigDict()
  config.deq.forward = configs.solver('anderson', 12, 1e-3, 'rel')
  config.deq.backward = configs.solver('broyden', 12, 1e-3, 'rel')
  config.deq.pretrain_steps = 32_000     # unrolled weight-tied phase
  config.deq.pretrain_layers = 2         # weight-tied applications when pre-training
  config.deq.eval_pretrain_layers = 24   # unrolled depth when evaluating then
  config.deq.compute_dtype = 'float32'   # DEQ layer dtype: 'float32' | 'bfloat16'
                                         # | 'float16' (params, grads, solvers
                                         # stay float32; faster on accelerators)
  config.jacobian = configs.jacobian(
      weight=1.6, probability=0.35,
      weight_final=2.5)   # gamma at the end, raised in steps of 0.1
  if preset in ('small', 'quickstart'):
    config.data.name = 'wikitext-2'
    config.batch_size = 8
    config.eval_batch_size = 8
    config.data.seq_len = config.data.eval_seq_len = 32
    config.num_steps = 400
    config.deq.pretrain_steps = 100
    config.deq.eval_pretrain_layers = 6
    config.learning_rate = 1e-3
    config.optimizer.schedule = 'cosine'
    config.optimizer.warmup_steps = 0
    config.model.update(d_model=64, n_head=4, d_head=16, d_inner=256,
                        cutoffs=(2_000, 10_000), div_val=4, dropout=0.05,
                        dropatt=0.0, mem_len=32, n_layer=4, init_std=0.05,
                        proj_init_std=0.05)
    config.log_every, config.eval_every, config.checkpoint_every = 20, 100, 0
  if preset == 'quickstart':
    config.checkpoint_minutes = 0.0  # seconds-long: no time-based checkpoints
    config.batch_size = config.eval_batch_size = 4
    config.data.seq_len = config.data.eval_seq_len = 16
    config.num_steps = 12
    config.deq.pretrain_steps = 4
    config.eval_max_batches = 4
    config.final_eval_whole_split = False
    config.model.update(d_model=32, n_head=2, d_inner=64, mem_len=16, n_layer=2)
    config.deq.forward.max_iter = config.deq.backward.max_iter = 6
    config.log_every, config.eval_every, config.checkpoint_every = 4, 0, 0
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError with one sentence for a value out of range."""
  from jreg.tasks import deq_lm  # pylint: disable=g-import-not-at-top
  deq_lm.check(config)
