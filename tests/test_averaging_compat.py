"""State dicts written by emafuse before the averaging names were unified (commit 1e39095: e.g.
``num_updates_applied``, BEMA's ``step``/``update_freq``, PowerEMA's ``num_steps``, LAWA's
``every``/``count``/``step``) still load, and training continues from them bit for bit as it did
with the code that wrote them.

``OLD_STATES`` (at the end) was produced by that code: for each class, ``drive`` over steps 1-5,
``copy.deepcopy(state_dict())``, the model's state at that point, then ``drive`` over steps 6-10
and the averaged weights (``result``). The test loads the state into an object built from
another model and drives steps 6-10 again."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from emafuse.averaging import BEMA, LAWA, SWA, ModelEMA, PostHocEMA, PowerEMA, SwitchEMA, TeacherEMA
from torch import nn


def make() -> nn.Module:
    m = nn.Module()
    m.w = nn.Parameter(torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64))
    m.v = nn.Parameter(torch.tensor([[0.25, 3.0], [-0.75, 1.5]], dtype=torch.float64))
    m.register_buffer("b", torch.tensor([1.0, 2.0], dtype=torch.float64))
    m.register_buffer("n", torch.tensor(0, dtype=torch.int64))
    return m


def move(m: nn.Module, t: int) -> None:
    with torch.no_grad():
        m.w.copy_(torch.tensor([math.sin(t) + 0.5 * t, math.cos(3 * t), 2.0 - 0.1 * t * t], dtype=torch.float64))
        m.v.mul_(0.9).add_(0.1 * t)
        m.b.add_(0.25 * t)
        m.n.fill_(7 * t)


BUILDERS = {
    "ModelEMA": lambda m: ModelEMA(m, 0.9, schedule="warmup", update_every=2, power=0.75),
    "ModelEMA_lightning": lambda m: ModelEMA(m, 0.8, preset="lightning"),
    "SwitchEMA": lambda m: SwitchEMA(m, 0.5),
    "SWA": lambda m: SWA(m),
    "TeacherEMA": lambda m: TeacherEMA(m, base=0.9, total_steps=8),
    "BEMA": lambda m: BEMA(m, update_after_step=1, update_every=2),
    "PowerEMA": lambda m: PowerEMA(m, (0.05, 0.10), update_every=2),
    "PostHocEMA": lambda m: PostHocEMA(m, (0.05, 0.10), snapshot_every=2),
    "LAWA": lambda m: LAWA(m, k=3, update_every=2),
}


def drive(name: str, avg, m: nn.Module, ts) -> None:
    for t in ts:
        move(m, t)
        avg.update(m)
        if name == "SwitchEMA" and t % 3 == 0:
            avg.end_of_epoch(m)


def result(name: str, avg):
    if name in ("PowerEMA", "PostHocEMA"):
        # Only the averaged parameters: the tracks' buffers now follow the model at every update.
        return [{k: v for k, v in mod.state_dict().items() if k in ("w", "v")} for mod in avg.modules]
    if name == "LAWA":
        return avg.average().state_dict()
    return avg.module.state_dict()


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return all(equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_old_state_dict_loads_and_continues_bitwise(name):
    old = OLD_STATES[name]
    model = make()
    model.load_state_dict(old["model"])
    avg = BUILDERS[name](make())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. no "hyper-parameters differ"
        avg.load_state_dict(copy.deepcopy(old["state"]))
    # The same counters as an average that saw those five steps with today's code.
    fresh_model = make()
    fresh = BUILDERS[name](fresh_model)
    drive(name, fresh, fresh_model, range(1, 6))
    assert (avg.num_steps_seen, avg.num_updates) == (fresh.num_steps_seen, fresh.num_updates) == (5, fresh.num_updates)
    drive(name, avg, model, range(6, 11))
    assert equal(result(name, avg), old["final"])
    drive(name, fresh, fresh_model, range(6, 11))
    assert (avg.num_steps_seen, avg.num_updates) == (fresh.num_steps_seen, fresh.num_updates)
    assert equal(result(name, fresh), result(name, avg))


def test_new_state_dicts_use_the_unified_names():
    for name, build in BUILDERS.items():
        st = build(make()).state_dict()
        assert "num_steps_seen" in st and "num_updates" in st, name
        assert not {"num_updates_applied", "step", "num_steps", "count", "every"} & set(st), name


# Written by emafuse at commit 1e39095 (see the module docstring).
OLD_STATES = {
    'ModelEMA': {
        'state': {
            'module': {
                'w': torch.tensor([1.4933064112216181, -0.896865852532881, 0.9362389640273057], dtype=torch.float64),
                'v': torch.tensor(
                    [[0.7936605725887925, 2.869508476550982], [0.03880678932981457, 1.737227801662515]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([2.6811091796462736, 3.6811091796462736], dtype=torch.float64),
                'n': torch.tensor(35, dtype=torch.int64),
            },
            'num_steps_seen': 5,
            'num_updates_applied': 3,
            'initialized': True,
            'config': {
                'decay': 0.9,
                'schedule': 'warmup',
                'update_after_step': 0,
                'update_every': 2,
                'inv_gamma': 1.0,
                'power': 0.75,
                'first_update': 'copy',
                'formula': 'lerp',
                'buffers': 'average',
                'non_float': 'copy',
                'complex': 'average',
                'final_decay': 1.0,
                '_float32_decay': False,
                'start_step': 0,
                'min_decay': 0.0,
                'gamma': None,
                'sigma_rel': None,
                'total_steps': None,
                'batch_scale': 1.0,
                'interval_compensation': False,
                'exclude': (),
                'exclude_prefix': (),
                'copy_names': (),
            },
            'preset': None,
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([2.6510935519359276, -0.7149710083058421, -1.1377515798116031], dtype=torch.float64),
            'v': torch.tensor(
                [[1.63656976816785, 3.3752452763883176], [1.0043241288149527, 2.4268768173589716]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([5.520726675283697, 6.520726675283697], dtype=torch.float64),
            'n': torch.tensor(63, dtype=torch.int64),
        },
    },
    'ModelEMA_lightning': {
        'state': {
            'module': {
                'w': torch.tensor([1.462168678734031, -0.44072511195034925, 1.0468800000000003], dtype=torch.float64),
                'v': torch.tensor(
                    [[0.7421225, 2.854040000000001], [-0.025847500000000107, 1.7020850000000003]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([2.5211999999999994, 3.5211999999999994], dtype=torch.float64),
                'n': torch.tensor(17, dtype=torch.int64),
            },
            'num_steps_seen': 5,
            'num_updates_applied': 5,
            'initialized': True,
            'config': {
                'decay': 0.8,
                'schedule': 'constant',
                'update_after_step': 0,
                'update_every': 1,
                'inv_gamma': 1.0,
                'power': 0.6666666666666666,
                'first_update': 'copy',
                'formula': 'muladd',
                'buffers': 'average',
                'non_float': 'truncate',
                'complex': 'average',
                'final_decay': 1.0,
                '_float32_decay': False,
                'start_step': 0,
                'min_decay': 0.0,
                'gamma': None,
                'sigma_rel': None,
                'total_steps': None,
                'batch_scale': 1.0,
                'interval_compensation': False,
                'exclude': (),
                'exclude_prefix': (),
                'copy_names': (),
            },
            'preset': 'lightning',
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([3.4434417337725147, -0.10800814267226184, -3.224190361599999], dtype=torch.float64),
            'v': torch.tensor(
                [[2.4484768711850005, 3.9086840482400005], [1.917492443165, 3.1122074062099996]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([8.347346815999998, 9.347346815999998], dtype=torch.float64),
            'n': torch.tensor(44, dtype=torch.int64),
        },
    },
    'SwitchEMA': {
        'state': {
            'module': {
                'w': torch.tensor(
                    [1.4633542973007838, -0.29276087208498824, 0.20937499999999998],
                    dtype=torch.float64,
                ),
                'v': torch.tensor(
                    [[1.0286300000000002, 2.975520000000001], [0.32066999999999996, 1.9135800000000005]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([3.34375, 4.34375], dtype=torch.float64),
                'n': torch.tensor(35, dtype=torch.int64),
            },
            'num_steps_seen': 5,
            'num_updates_applied': 5,
            'initialized': True,
            'config': {
                'decay': 0.5,
                'schedule': 'constant',
                'update_after_step': 0,
                'update_every': 1,
                'inv_gamma': 1.0,
                'power': 0.6666666666666666,
                'first_update': 'average',
                'formula': 'lerp',
                'buffers': 'average',
                'non_float': 'copy',
                'complex': 'average',
                'final_decay': 1.0,
                '_float32_decay': False,
                'start_step': 0,
                'min_decay': 0.0,
                'gamma': None,
                'sigma_rel': None,
                'total_steps': None,
                'batch_scale': 1.0,
                'interval_compensation': False,
                'exclude': (),
                'exclude_prefix': (),
                'copy_names': (),
            },
            'preset': None,
            'epoch': 1,
            'num_switches': 1,
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor(
                [[1.3189662500000001, 3.110990000000001], [0.66732125, 2.1335225000000007]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([4.21875, 5.21875], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([4.4702485965855345, 0.034366439793412445, -6.29970703125], dtype=torch.float64),
            'v': torch.tensor(
                [[3.037559415448438, 4.397858621012501], [2.5429051588796874, 3.655877236159376]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([9.9375, 10.9375], dtype=torch.float64),
            'n': torch.tensor(70, dtype=torch.int64),
        },
    },
    'SWA': {
        'state': {
            'module': {
                'w': torch.tensor([1.5352323299444757, -0.17135728519221716, 0.9000000000000001], dtype=torch.float64),
                'v': torch.tensor(
                    [[0.8183415000000002, 2.8454160000000006], [0.08122349999999998, 1.739739]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
                'n': torch.tensor(35, dtype=torch.int64),
            },
            'num_steps_seen': 5,
            'num_updates_applied': 5,
            'initialized': True,
            'config': {
                'decay': 0.0,
                'schedule': 'constant',
                'update_after_step': 0,
                'update_every': 1,
                'inv_gamma': 1.0,
                'power': 0.6666666666666666,
                'first_update': 'copy',
                'formula': 'lerp',
                'buffers': 'copy',
                'non_float': 'copy',
                'complex': 'average',
                'final_decay': 1.0,
                '_float32_decay': False,
                'start_step': 0,
                'min_decay': 0.0,
                'gamma': None,
                'sigma_rel': None,
                'total_steps': None,
                'batch_scale': 1.0,
                'interval_compensation': False,
                'exclude': (),
                'exclude_prefix': (),
                'copy_names': (),
            },
            'preset': None,
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([2.891118837121801, -0.04579073294505298, -1.85], dtype=torch.float64),
            'v': torch.tensor(
                [[1.9222519861675003, 3.5342728469200004], [1.3360625822575003, 2.6549887410550004]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([14.75, 15.75], dtype=torch.float64),
            'n': torch.tensor(70, dtype=torch.int64),
        },
    },
    'TeacherEMA': {
        'state': {
            'module': {
                'w': torch.tensor([0.858164492430468, -0.8714157947706298, 1.6635499729514893], dtype=torch.float64),
                'v': torch.tensor(
                    [[0.4259684929463865, 2.940538442594385], [-0.4884205796528859, 1.5689548336954768]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(0, dtype=torch.int64),
            },
            'num_steps_seen': 5,
            'num_updates_applied': 5,
            'initialized': True,
            'config': {
                'decay': 0.9,
                'schedule': 'cosine',
                'update_after_step': 0,
                'update_every': 1,
                'inv_gamma': 1.0,
                'power': 0.6666666666666666,
                'first_update': 'average',
                'formula': 'lerp',
                'buffers': 'skip',
                'non_float': 'copy',
                'complex': 'average',
                'final_decay': 1.0,
                '_float32_decay': False,
                'start_step': 0,
                'min_decay': 0.0,
                'gamma': None,
                'sigma_rel': None,
                'total_steps': 8,
                'batch_scale': 1.0,
                'interval_compensation': False,
                'exclude': (),
                'exclude_prefix': (),
                'copy_names': (),
            },
            'preset': None,
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([0.9784418745664468, -0.8153539799882906, 1.475015470323479], dtype=torch.float64),
            'v': torch.tensor(
                [[0.5099887317910623, 2.970090767656677], [-0.38459382670552483, 1.6282169299117961]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
            'n': torch.tensor(0, dtype=torch.int64),
        },
    },
    'BEMA': {
        'state': {
            'step': 5,
            'last_event': 5,
            'module': {
                'w': torch.tensor(
                    [1.5759461447800123, -0.7759043731766468, -0.32639269793616754],
                    dtype=torch.float64,
                ),
                'v': torch.tensor(
                    [[1.3880836940007386, 3.034044481424454], [0.7895524985739333, 2.136247688284245]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
                'n': torch.tensor(35, dtype=torch.int64),
            },
            'ema': [
                torch.tensor([1.4582003937214179, -0.9117597948115828, 1.0893542517191679], dtype=torch.float64),
                torch.tensor(
                    [[0.7173544050282468, 2.8654054239380087], [-0.06375505639348472, 1.693741231805411]],
                    dtype=torch.float64,
                ),
            ],
            'anchor': [
                torch.tensor([1.3414709848078965, -0.9899924966004454, 1.9], dtype=torch.float64),
                torch.tensor(
                    [[0.325, 2.8000000000000003], [-0.5750000000000001, 1.4500000000000002]],
                    dtype=torch.float64,
                ),
            ],
            'hyper': {
                'ema_power': 0.5,
                'bias_power': 0.2,
                'lag': 10.0,
                'multiplier': 1.0,
                'update_after': 1,
                'update_freq': 2,
                'min_ema_multiplier': 0.0,
                'compat': 'canonical',
            },
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([4.791018911995732, -0.30467653118626115, -5.855276987247574], dtype=torch.float64),
            'v': torch.tensor(
                [[3.5471113855093788, 4.490115897866291], [3.204200653743229, 3.975749800217066]],
                dtype=torch.float64,
            ),
            'b': torch.tensor([12.25, 13.25], dtype=torch.float64),
            'n': torch.tensor(63, dtype=torch.int64),
        },
    },
    'PowerEMA': {
        'state': {
            't': 5.0,
            't_last': 5.0,
            'num_steps': 5,
            'gammas': [16.97219860230345, 6.937203937601809],
            'sigma_rels': [0.05, 0.1],
            'time_unit': 'steps',
            'update_every': 2,
            'tracks': [
                {
                    'w': torch.tensor(
                        [1.5410860311552181, -0.7597035133240622, -0.49983517989159165],
                        dtype=torch.float64,
                    ),
                    'v': torch.tensor(
                        [[1.4619584563690016, 3.085845194113668], [0.8714541880982137, 2.200088791707486]],
                        dtype=torch.float64,
                    ),
                    'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                    'n': torch.tensor(0, dtype=torch.int64),
                },
                {
                    'w': torch.tensor(
                        [1.5428100125956348, -0.7623147037299508, -0.4722478475354983],
                        dtype=torch.float64,
                    ),
                    'v': torch.tensor(
                        [[1.4495649823414336, 3.0800200649619844], [0.8566722250248694, 2.190680928987138]],
                        dtype=torch.float64,
                    ),
                    'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                    'n': torch.tensor(0, dtype=torch.int64),
                },
            ],
            'snapshots': [],
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': [
            {
                'w': torch.tensor([4.903800853228456, -0.29493669076196866, -6.0649769900041], dtype=torch.float64),
                'v': torch.tensor(
                    [[3.570947929003707, 4.639092591952267], [3.1825316879315033, 4.056468230343962]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(0, dtype=torch.int64),
            },
            {
                'w': torch.tensor([4.7847687423470004, -0.32893231325823513, -5.641781607761517], dtype=torch.float64),
                'v': torch.tensor(
                    [[3.4167269918619896, 4.519100807126057], [3.0158637863114195, 3.917805998800202]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(0, dtype=torch.int64),
            },
        ],
    },
    'PostHocEMA': {
        'state': {
            't': 5.0,
            't_last': 5.0,
            'num_steps': 5,
            'gammas': [16.97219860230345, 6.937203937601809],
            'sigma_rels': [0.05, 0.1],
            'time_unit': 'steps',
            'update_every': 1,
            'tracks': [
                {
                    'w': torch.tensor(
                        [1.5357172451427163, -0.7308019616770571, -0.48361400429225965],
                        dtype=torch.float64,
                    ),
                    'v': torch.tensor(
                        [[1.4548732698804048, 3.0820119564395307], [0.8631864747679953, 2.194481763770916]],
                        dtype=torch.float64,
                    ),
                    'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                    'n': torch.tensor(0, dtype=torch.int64),
                },
                {
                    'w': torch.tensor(
                        [1.497480831596536, -0.516006301717086, -0.3343858277416607],
                        dtype=torch.float64,
                    ),
                    'v': torch.tensor(
                        [[1.389326397105594, 3.0475040662775643], [0.7863526992248774, 2.143043519456489]],
                        dtype=torch.float64,
                    ),
                    'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                    'n': torch.tensor(0, dtype=torch.int64),
                },
            ],
            'snapshots': [
                {
                    't': 2.0,
                    'gamma': 16.97219860230345,
                    'sigma_rel': 0.05,
                    'state': {
                        'w': torch.tensor([1.9091796875, 0.9599609375, 1.599609375], dtype=torch.float16),
                        'v': torch.tensor(
                            [[0.492431640625, 2.720703125], [-0.3173828125, 1.5048828125]],
                            dtype=torch.float16,
                        ),
                    },
                },
                {
                    't': 2.0,
                    'gamma': 6.937203937601809,
                    'sigma_rel': 0.1,
                    'state': {
                        'w': torch.tensor([1.9072265625, 0.9521484375, 1.6015625], dtype=torch.float16),
                        'v': torch.tensor(
                            [[0.49169921875, 2.720703125], [-0.318603515625, 1.5048828125]],
                            dtype=torch.float16,
                        ),
                    },
                },
                {
                    't': 4.0,
                    'gamma': 16.97219860230345,
                    'sigma_rel': 0.05,
                    'state': {
                        'w': torch.tensor([1.2451171875, 0.833984375, 0.404052734375], dtype=torch.float16),
                        'v': torch.tensor(
                            [[1.0673828125, 2.873046875], [0.41064453125, 1.8876953125]],
                            dtype=torch.float16,
                        ),
                    },
                },
                {
                    't': 4.0,
                    'gamma': 6.937203937601809,
                    'sigma_rel': 0.1,
                    'state': {
                        'w': torch.tensor([1.28515625, 0.67236328125, 0.473388671875], dtype=torch.float16),
                        'v': torch.tensor(
                            [[1.03515625, 2.859375], [0.370849609375, 1.8642578125]],
                            dtype=torch.float16,
                        ),
                    },
                },
            ],
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': [
            {
                'w': torch.tensor([4.524522390918708, 0.09855905208375583, -7.680563355215845], dtype=torch.float64),
                'v': torch.tensor(
                    [[4.116806902303848, 5.094088509175067], [3.7614317725324957, 4.561025814518039]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(0, dtype=torch.int64),
            },
            {
                'w': torch.tensor([4.587802753821951, 0.041548432084132114, -6.771304495799342], dtype=torch.float64),
                'v': torch.tensor(
                    [[3.801008612974543, 4.837273487382666], [3.42418502228068, 4.272038101341872]],
                    dtype=torch.float64,
                ),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(0, dtype=torch.int64),
            },
        ],
    },
    'LAWA': {
        'state': {
            'k': 3,
            'every': 2,
            'start_step': 0,
            'slot': 2,
            'count': 2,
            'step': 5,
            'slot_steps': [2, 4, None],
            'ring': [
                [
                    torch.tensor([1.9092974268256817, 0.960170286650366, 1.6], dtype=torch.float64),
                    torch.tensor(
                        [[0.49250000000000005, 2.7200000000000006], [-0.31750000000000006, 1.5050000000000001]],
                        dtype=torch.float64,
                    ),
                    torch.tensor([1.75, 2.75], dtype=torch.float64),
                ],
                [
                    torch.tensor([1.2431975046920718, 0.8438539587324921, 0.3999999999999999], dtype=torch.float64),
                    torch.tensor(
                        [[1.0689250000000001, 2.873200000000001], [0.412825, 1.8890500000000001]],
                        dtype=torch.float64,
                    ),
                    torch.tensor([3.5, 4.5], dtype=torch.float64),
                ],
                None,
            ],
            'module': {
                'w': torch.tensor([0.5, -1.25, 2.0], dtype=torch.float64),
                'v': torch.tensor([[0.25, 3.0], [-0.75, 1.5]], dtype=torch.float64),
                'b': torch.tensor([1.0, 2.0], dtype=torch.float64),
                'n': torch.tensor(28, dtype=torch.int64),
            },
        },
        'model': {
            'w': torch.tensor([1.5410757253368614, -0.7596879128588213, -0.5], dtype=torch.float64),
            'v': torch.tensor([[1.4620325000000003, 3.085880000000001], [0.8715425, 2.200145]], dtype=torch.float64),
            'b': torch.tensor([4.75, 5.75], dtype=torch.float64),
            'n': torch.tensor(35, dtype=torch.int64),
        },
        'final': {
            'w': torch.tensor([4.055307212511695, 0.41291572182288705, -4.666666666666666], dtype=torch.float64),
            'v': torch.tensor([[3.040975504475, 4.2423466004], [2.604113287775, 3.58705327535]], dtype=torch.float64),
            'b': torch.tensor([10.333333333333332, 11.333333333333332], dtype=torch.float64),
            'n': torch.tensor(70, dtype=torch.int64),
        },
    },
}
