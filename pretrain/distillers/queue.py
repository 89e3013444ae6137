"""The queues (memory banks) of the queue-based distillers: CxK tensors whose columns are past embeddings."""
import torch


@torch.no_grad()
def enqueue_columns(queue: torch.Tensor, ptr: torch.Tensor, entries: torch.Tensor) -> None:
    """Write ``entries`` (NxC) over the oldest columns of ``queue`` (CxK), from ``ptr`` on, wrapping around the end
    (so K need not be a multiple of N), and advance ``ptr`` (a 1-element long tensor) by N modulo K."""
    size = queue.shape[1]
    n = entries.shape[0]
    if n > size:
        raise ValueError(f"a batch of {n} entries does not fit a queue of {size}")
    start = int(ptr)
    cols = (torch.arange(n, device=queue.device) + start) % size
    queue[:, cols] = entries.t().to(queue.dtype)
    ptr[0] = (start + n) % size
