"""Evaluating a run beyond held-out loss (docs/evaluation.md).

``metrics`` (ROUGE-L, BLEU, exact match), ``generate`` (batched, left-padded generation),
``generation`` (answers on every client's held-out split per variant, scored; ``fedtune eval
--generate``), ``harness`` (lm-evaluation-harness tasks on base and adapter; ``--tasks``),
``judge`` / ``judge_client`` (LLM-as-judge over an OpenAI-compatible endpoint; ``fedtune judge``).
"""
