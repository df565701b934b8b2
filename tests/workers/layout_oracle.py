"""Worker: ask megatron-core itself whether it accepts each layout, in a fake (no-communication)
process group of the layout's world size. Prints one JSON line: {"world tp pp ep etp": verdict}.

    python tests/workers/layout_oracle.py '[[32, 4, 2, 8, 4], [32, 4, 2, 8, 1]]'
"""

import json
import sys


def main():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron_opd.platform import activate_platform

    activate_platform()
    from megatron.core import parallel_state as ps

    verdicts = {}
    for world, tp, pp, ep, etp in json.loads(sys.argv[1]):
        dist.init_process_group(backend="fake", rank=0, world_size=world, store=FakeStore())
        try:
            ps.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                create_gloo_process_groups=False)
            verdicts[f"{world} {tp} {pp} {ep} {etp}"] = ["ok", ps.get_data_parallel_world_size(),
                                                         ps.get_expert_data_parallel_world_size()]
        except (RuntimeError, AssertionError) as exc:
            verdicts[f"{world} {tp} {pp} {ep} {etp}"] = ["refused", str(exc)]
        finally:
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
            dist.destroy_process_group()
    print(json.dumps(verdicts))


if __name__ == "__main__":
    main()
