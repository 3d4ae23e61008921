"""A test model that reports its metrics from several threads at once, as the decoders do from
their step loop and worker threads (tests/test_model_metrics.py).

VALUE (INT32 [1]) -> DOUBLED (INT32 [1]); each of THREADS threads reports VALUE generated tokens
(one at a time) and the rows in flight, so a request of VALUE n adds THREADS * n tokens.
"""

from concurrent.futures import ThreadPoolExecutor

from tritonkit.batched_model import BatchedModel

THREADS = 4


class TritonPythonModel(BatchedModel):
    metrics_role = "decoder"

    def run(self, batch):
        values = batch["VALUE"]

        def report(thread: int) -> None:
            for k in range(int(values.sum())):
                self.metrics.decoded(tokens=1, steps=1)
                self.metrics.decoder_rows(running=thread, queued=k)

        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(report, range(THREADS)))
        return {"DOUBLED": values * 2}
