"""Per-process batches: the checkpointable grain train iterator and deterministic eval batches.

This module owns cutting a dict of example arrays (name -> [N, ...], from any stage's data
module) into the per-process numpy batches a step consumes: an endless, seeded, checkpointable
training iterator and a fixed list of evaluation batches.

Multi-process data: every process builds the same global example order, and process p takes
rows [p*b, (p+1)*b) of each global batch of process_count*b rows, so the processes' batches are
disjoint and together form the global batch.
"""

from __future__ import annotations

import grain
import numpy as np

# A batch is a few small numpy gathers, so two threads and a short prefetch queue keep up while
# bounding host memory for large batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def _num_examples(examples: dict[str, np.ndarray]) -> int:
    sizes = {name: len(array) for name, array in examples.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"examples must be arrays with one shared leading size, got {sizes}")
    return next(iter(sizes.values()))


def _global_batch(batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return batch_size * process_count


class _TakeProcessRows:
    """Maps a global batch of example indices to this process's rows of the examples."""

    def __init__(self, examples: dict[str, np.ndarray], start: int, size: int):
        self.examples, self.start, self.size = examples, start, size

    def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        rows = indices[self.start : self.start + self.size]  # [b]
        return {name: array[rows] for name, array in self.examples.items()}


def make_train_iterator(
    examples: dict[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of per-process training batches.

    Each epoch is a fresh seeded permutation of the examples cut into N // G global batches of
    G = batch_size * process_count (the N % G left over are dropped for that epoch only, so a
    global batch never holds an example twice); epochs repeat forever. Process p gets rows
    [p*batch_size, (p+1)*batch_size) of each global batch.

    Args:
      examples: name -> array [N, ...] (e.g. the output of `pack_documents`).
      batch_size: per-process batch size b.
      seed: shuffle seed, in [0, 2**32).
      process_index, process_count: this process and the number of processes.
      shuffle: if False, examples come in order, epoch after epoch.

    Returns:
      A grain iterator yielding {name: array [b, ...]}; `get_state()` is a JSON-serializable
      dict and after `set_state(state)` the iterator yields exactly the batches that followed.
    """
    global_batch = _global_batch(batch_size, process_index, process_count)
    n = _num_examples(examples)
    if n < global_batch:
        raise ValueError(
            f"only {n} training examples, but one global batch needs {global_batch} "
            f"(batch_size {batch_size} x {process_count} processes)"
        )
    ds = grain.MapDataset.source(range(n))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # Batching before repeat() batches each epoch on its own; repeat() reseeds the shuffle each
    # epoch (epoch e uses seed + e).
    ds = ds.batch(global_batch, drop_remainder=True, batch_fn=np.asarray).repeat()
    ds = ds.map(_TakeProcessRows(examples, process_index * batch_size, batch_size))
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_batches(
    examples: dict[str, np.ndarray],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_batches: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Deterministic per-process evaluation batches, in example order.

    With at least one full global batch, the remainder is dropped. Otherwise the examples are
    padded to one global batch with all-zero rows (zero is PAD_ID, and "mask" is 0 there), so a
    tiny eval set still evaluates; padding needs a "mask" entry in `examples`.

    Args:
      examples: name -> array [N, ...].
      batch_size: per-process batch size b.
      process_index, process_count: this process and the number of processes.
      max_batches: keep at most this many batches.

    Returns:
      A list of {name: array [b, ...]}, the same length on every process.
    """
    global_batch = _global_batch(batch_size, process_index, process_count)
    n = _num_examples(examples)
    if n == 0:
        return []
    if n < global_batch:
        if "mask" not in examples:
            raise ValueError(
                f"{n} eval examples are fewer than one global batch ({global_batch}) and cannot "
                "be padded without a 'mask' entry"
            )
        examples = {
            name: np.concatenate([a, np.zeros((global_batch - n, *a.shape[1:]), a.dtype)])
            for name, a in examples.items()
        }
    num = len(next(iter(examples.values()))) // global_batch
    if max_batches is not None:
        num = min(num, max_batches)
    starts = [i * global_batch + process_index * batch_size for i in range(num)]
    return [{name: a[lo : lo + batch_size] for name, a in examples.items()} for lo in starts]
