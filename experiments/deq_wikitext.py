r"""DEQ-Transformer on WikiText with Jacobian regularisation.

Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
Regularization", ICML 2021, Sec. 5.2 and Appendix A (Tables 3-4): the
DEQ-Transformer of Bai, Kolter & Koltun (NeurIPS 2019) on WikiText-103, trained
with Adam (2.5e-4, linear warm-up then cosine decay), batch 60 x 150 tokens,
memory of 300 positions, forward / backward solver budgets 12 / 12 NFE, an
unrolled weight-tied pre-training phase, and the Jacobian term
gamma * ||J_f(z*)||_F^2 / d on a random fraction p = 0.35 of the steps with
gamma raised from 1.6 to 2.5. The `paper` preset of
`experiments/configs/deq_wikitext.py` is that run:

    python -m experiments.deq_wikitext --workdir=runs/wt103 --config.parallel=sharded
    python -m experiments.deq_wikitext --workdir=runs/wt2_small \
        --config=experiments/configs/deq_wikitext.py:small
    python -m experiments.deq_wikitext --workdir=runs/wt2_small_nojr \
        --config=experiments/configs/deq_wikitext.py:small --config.jacobian.weight=0

`--config.model.architecture=transformer_xl` trains the explicit (untied)
Transformer-XL stack instead. The objective, the gamma schedule and the ordered
evaluation are `jreg.tasks.deq_lm`'s; `jreg.tasks.deq_lm.plot_runs` draws
several finished runs into one figure.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from jreg import cli
from jreg import tasks
from jreg.data import wikitext
from jreg.models import count_params
from jreg.tasks import deq_lm as task


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes, or re-reports) one run; writes results.json and PNG."""
  cli.validate('deq_wikitext', config)
  source, data_dir = tasks.data_source(config.data.source, config.data.dir)
  corpus = wikitext.load_wikitext(config.data.name, source=source,
                                  data_dir=data_dir)
  built = task.build(config, len(corpus.vocabulary))
  state, history = task.train(config, workdir, corpus, built)
  valid = [r for r in history if r['split'] == 'eval'][-1]
  if config.eval_max_batches and config.final_eval_whole_split:
    # Periodic evaluations read part of the split; the reported one reads it
    # all, once: a re-run of a finished command reads it back.
    whole = [r for r in history if r['split'] == 'eval_whole']
    if whole:
      valid = whole[-1]
    else:
      valid = dict(task.perplexity(built, state.params, corpus.valid,
                                   config.eval_batch_size, config.data.eval_seq_len),
                   step=config.num_steps, split='eval_whole')
      if jax.process_index() == 0:
        with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
          f.write(json.dumps(valid) + '\n')
  results = task.summarize(config, built, history, valid,
                           count_params(state.params))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
    task.plot_runs({'this run': workdir}, os.path.join(workdir, 'training.png'))
  return results


if __name__ == '__main__':
  cli.main(run, 'deq_wikitext')
