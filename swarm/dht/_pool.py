"""A pool of deterministic identities with solved puzzles, for local swarms, tests and
benchmarks (``_local``).

Identity ``i`` of the pool is ``Identity.derive(b"swarm-peer local pool " + i as 4
big-endian bytes)``; ``COUNTERS[i]`` is where that search stops, so building it costs
one key derivation instead of thousands. Regenerate with ``python -m swarm.dht._pool N``.
"""

from __future__ import annotations

import functools
import sys

from protocol import Identity
from protocol import derive_counter

__all__ = ["COUNTERS", "POOL_SIZE", "pool_identity", "pool_label"]

COUNTERS = (
    3974, 7050, 7769, 2053, 7586, 3012, 3314, 4680, 2767, 7454, 4380, 10415, 1037, 304, 1902,
    21826, 7821, 4410, 2717, 5686, 3175, 2341, 2449, 1447, 5666, 17909, 104, 9462, 5058, 3445,
    1393, 2171, 4939, 3219, 637, 1991, 9051, 4652, 1325, 3416, 238, 561, 2271, 541, 4554, 821,
    7621, 1429, 6, 1644, 3968, 320, 270, 618, 6636, 12034, 4759, 550, 1989, 13191, 6363, 6834,
    19031, 4573, 5503, 13331, 477, 546, 8647, 2176, 1926, 1743, 8208, 1314, 3654, 2574, 683,
    1285, 14586, 6126, 8597, 2397, 2250, 1511, 4885, 8171, 4802, 13210, 1743, 3157, 1082, 707,
    2710, 3017, 6847, 5665, 1499, 87, 1642, 9020, 5195, 5610, 1025, 685, 2, 1960, 1168, 978,
    285, 632, 1838, 8794, 6544, 392, 6564, 2610, 5042, 2187, 7009, 3205, 66, 3519, 1594, 1436,
    57, 9296, 8451, 1129, 2410, 17918, 961, 1099, 3012, 376, 17063, 4028, 430, 2067, 907, 3763,
    1249, 770, 8155, 1372, 6378, 1060, 4597, 4308, 1277, 3662, 7056, 2293, 871, 1038, 5473, 538,
    13443, 157, 867, 411, 4227, 4139, 7708, 3187, 6157, 145, 3193, 3674, 1026, 3255, 2374, 9994,
    5174, 8268, 2999, 555, 10435, 1230, 457, 315, 754, 5498, 19496, 1511, 4166, 11453, 4174,
    4064, 236, 4070, 1176, 2922, 2664, 17006, 24639, 3116, 6496, 1561, 4289, 6248, 3744, 2451,
    4255, 16519, 3659, 4134, 11, 39, 994, 63, 7461, 9053, 83, 1155, 1712, 1203, 8526, 979, 1184,
    1290, 4185, 2698, 177, 6064, 129, 490, 4736, 936, 1921, 2086, 17231, 6286, 14645, 952, 1465,
    416, 160, 1234, 7593, 4537, 1367, 731, 12, 20, 12377, 1668, 14716, 1706, 3075, 800, 3598,
    2968, 10303, 4812, 1542, 912, 5109, 244, 1553, 4569, 4075, 563, 6020, 265, 4605, 1131, 3644,
    14899, 1725, 831, 1008, 178, 3528, 2855, 409, 7025, 1388, 1112, 1666, 552, 633, 2665, 2574,
    7424, 447, 6410, 752, 338, 11864, 3537, 1753, 1241, 5441, 4141, 2459, 106, 3044, 3679, 7865,
    176, 8025, 7797, 1384, 1734, 6550, 6745, 1727, 7757, 1088, 2592, 12156, 14868, 1536, 13463,
    5265, 14, 9058, 4693, 3230, 1804,
)
POOL_SIZE = len(COUNTERS)


def pool_label(index: int) -> bytes:
    return b"swarm-peer local pool " + index.to_bytes(4, "big")


@functools.lru_cache(maxsize=None)
def pool_identity(index: int) -> Identity:
    """Identity ``index`` of the pool (derived by a full search beyond ``POOL_SIZE``)."""
    start = COUNTERS[index] if index < POOL_SIZE else 0
    return Identity.derive(pool_label(index), start=start)


if __name__ == "__main__":
    size = int(sys.argv[1]) if len(sys.argv) > 1 else POOL_SIZE
    print(tuple(derive_counter(pool_label(i)) for i in range(size)))
