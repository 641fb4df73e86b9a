"""The heads of the last training stage: rank heads (position terms for the decoders) and the fused orderer.

A tiny model with stand-in encoders (as in tests/test_forward.py) checks shapes, masking, what ``forward``
returns, that the heads do not change the initialisation of anything else, and which parameters their loss
trains; the session's trained run (the ``tiny`` preset has both heads) checks saving, loading, and that the
paper's variants stay selectable at load time.
"""

from __future__ import annotations

import json

import pytest
import torch

from floats import assert_beyond_rounding, assert_float32_close
from iterwego.batch import Batch
from iterwego.config import AlignerConfig, Config, FusionConfig, OrdererConfig
from iterwego.errors import ModelLoadError
from iterwego.fusion import gather_items, gold_pairing
from iterwego.model import IterWeGO, RankHead, load_run, pair_loss, rank_loss
from test_forward import D_IMG, D_TXT, INDEX, LENGTHS, POS, REFERENCE_ULPS, stand_in

# Float budgets, in float32 ulps at the compared tensor's scale (tests/floats.py). The heads' outputs are one
# float32 computation compared with itself along another path (another batch, another presentation order, the
# forward against its parts): the same ~8 reductions in series as the orderer, so test_forward's REFERENCE_ULPS.
#: A log-softmax over <= 5 positions, then a sum of a few such terms, at scale ~1.
SOFTMAX_ULPS = 16


def within(lp: torch.Tensor, lengths=LENGTHS) -> torch.Tensor:
    """Each story's position log-probabilities of its items at positions within it. Positions past a story's end
    carry a -1e4 mask, whose float32 rounding (1e-3) would set the scale of a budget and hide a real change."""
    return torch.cat([lp[b, :n, :n].detach().reshape(-1) for b, n in enumerate(lengths)])


pytestmark = pytest.mark.usefixtures("one_thread")


def build(rank_head: bool, method: str, seed: int = 0) -> IterWeGO:
    torch.manual_seed(seed)
    cfg = Config(
        orderer=OrdererConfig(d_model=8, layers=1, heads=2, ffn=12, dropout=0.0, rank_head=rank_head, rank_positions=5),
        aligner=AlignerConfig(kind="learned", dim=5, mapping="hungarian"),
        fusion=FusionConfig(method=method),
    )
    return IterWeGO(cfg, stand_in("image", D_IMG), stand_in("text", D_TXT)).eval()


@pytest.fixture(scope="module")
def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    feats = {"image": torch.randn(7, D_IMG, generator=g), "text": torch.randn(7, D_TXT, generator=g)}
    return Batch([0, 1], {k: v.clone() for k, v in INDEX.items()}, {k: v.clone() for k, v in POS.items()}, feats)


def test_heads_leave_the_initialisation_of_everything_else_unchanged():
    plain, full = build(False, "sum").state_dict(), build(True, "orderer").state_dict()
    assert set(plain) < set(full)
    assert all(torch.equal(plain[k], full[k]) for k in plain)
    extra = {k.split(".")[0] + "." + k.split(".")[1] for k in set(full) - set(plain)}
    assert extra == {"image.ranker", "text.ranker", "fuser.proj", "fuser.encoder", "fuser.classifier", "fuser.ranker"}
    a, b = full["image.ranker.mlp.0.weight"], full["text.ranker.mlp.0.weight"]
    assert not torch.equal(a, b)  # salted: the two rank heads do not start as copies


def test_rank_head_gives_position_distributions_within_each_story(batch):
    head = RankHead(8, 5, 0.0).eval()
    h = torch.randn(2, 4, 8)
    valid = batch.valid("image")
    with torch.no_grad():
        lp = head(h, valid)
        alone = head(h[1:, :3], valid[1:, :3])
    assert lp.shape == (2, 4, 5)
    for b, n in enumerate(LENGTHS):
        probs = lp[b, :n].exp()
        assert_float32_close(probs.sum(-1), torch.ones(n), ulps=SOFTMAX_ULPS)
        assert float(probs[:, n:].sum()) < 1e-30  # no position at or past the story's end
    # a story's positions do not depend on the other stories of the batch
    assert_float32_close(alone[0, :, :3], lp[1, :3, :3], ulps=REFERENCE_ULPS)


def test_rank_loss_is_the_nll_of_gold_positions_and_skips_stories_past_the_range():
    lp = torch.log_softmax(torch.randn(2, 4, 3), -1)
    pos = torch.tensor([[2, 0, 1, 0], [0, 1, 2, 3]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])  # story 1 has 4 > 3 positions
    assert_float32_close(rank_loss(lp, pos, valid), -(lp[0, 0, 2] + lp[0, 1, 0] + lp[0, 2, 1]), ulps=SOFTMAX_ULPS)


def test_gold_pairing_and_gather_items():
    pos_i, pos_t = POS["image"], POS["text"]
    iv, tv = pos_i >= 0, pos_t >= 0
    pairing = gold_pairing(pos_i, pos_t, iv, tv)
    assert pairing.tolist() == [[3, 2, 0, 1], [2, 1, 0, -1]]
    for b in range(2):
        for s in range(4):
            if iv[b, s]:
                assert int(pos_t[b, pairing[b, s]]) == int(pos_i[b, s])
    # an image whose sentence is missing pairs with nothing (-1), and gathers zeros
    tv2 = tv.clone()
    tv2[0, 3] = False  # text slot 3 (gold position 2, the sentence of image slot 0) is missing
    p2 = gold_pairing(pos_i, pos_t, iv, tv2)
    assert p2[0].tolist() == [-1, 2, 0, 1]
    x = torch.randn(2, 4, 3)
    got = gather_items(x, p2)
    assert torch.equal(got[0, 0], torch.zeros(3)) and torch.equal(got[0, 1], x[0, 2])
    assert torch.equal(got[1, 0], x[1, p2[1, 0]])


def test_forward_with_the_fused_orderer_reads_both_states_on_the_aligner_pairing(batch):
    model = build(True, "orderer")
    with torch.no_grad():
        fw = model(batch, 1)
        h_img = model.image.states(batch.feats["image"], batch.index["image"])
        h_txt = model.text.states(batch.feats["text"], batch.index["text"])
        x = torch.cat([h_img, gather_items(h_txt, fw.pairing)], -1)
        h = model.fuser.encoder(model.fuser.proj(x), batch.valid("image"))
        want = model.fuser.classifier(h)
    assert_float32_close(fw.fused, want, ulps=REFERENCE_ULPS)
    assert set(fw.ranks) == {"image", "text", "fused"}
    assert_float32_close(
        within(fw.ranks["fused"]), within(model.fuser.ranker(h, batch.valid("image"))), ulps=REFERENCE_ULPS
    )
    assert torch.equal(fw.unary("image", 2.0), 2.0 * fw.ranks["image"])  # doubling a float is exact
    without = model(batch, 1, positions=False)
    assert without.ranks == {} and without.unary("image", 1.0) is None
    assert torch.equal(without.fused, fw.fused)


def test_fused_orderer_is_equivariant_to_the_presentation_order(batch):
    model = build(True, "orderer")
    perm = {"image": torch.tensor([3, 1, 0, 2]), "text": torch.tensor([2, 0, 3, 1])}
    shuffled = Batch(
        batch.ids,
        {m: torch.stack([batch.index[m][0, perm[m]], batch.index[m][1]]) for m in perm},
        {m: torch.stack([batch.pos[m][0, perm[m]], batch.pos[m][1]]) for m in perm},
        batch.feats,
    )
    with torch.no_grad():
        a, b = model(batch, 0), model(shuffled, 0)
    p = perm["image"]
    assert_float32_close(b.fused[0], a.fused[0][p][:, p], ulps=REFERENCE_ULPS)
    assert_float32_close(
        within(b.ranks["fused"]),
        within(torch.stack([a.ranks["fused"][0][p], a.ranks["fused"][1]])),
        ulps=REFERENCE_ULPS,
    )
    # the companion: the unpermuted outputs miss by over 100 budgets
    assert_beyond_rounding(b.fused[0], a.fused[0], ulps=REFERENCE_ULPS)
    assert_beyond_rounding(within(b.ranks["fused"]), within(a.ranks["fused"]), ulps=REFERENCE_ULPS)


def test_heads_loss_trains_only_the_heads_and_sums_their_losses(batch):
    model = build(True, "orderer").train()
    states = model.frozen_states(batch)
    pos = batch.pos
    valid = {m: batch.valid(m) for m in ("image", "text")}
    loss = model.heads_loss(states, pos, valid)
    loss.backward()
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith(("image", "text")) else "")
               for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}  # fmt: skip
    assert trained == {"image.ranker", "text.ranker", "fuser"}
    model.eval()
    with torch.no_grad():
        iv = valid["image"]
        h = model.fuser.states(
            states["image"], states["text"], gold_pairing(pos["image"], pos["text"], iv, valid["text"]), iv
        )
        want = (
            rank_loss(model.image.ranker(states["image"], iv), pos["image"], iv)
            + rank_loss(model.text.ranker(states["text"], valid["text"]), pos["text"], valid["text"])
            + pair_loss(model.fuser.classifier(h), pos["image"], iv, "sum")
            + rank_loss(model.fuser.ranker(h, iv), pos["image"], iv)
        )
        assert_float32_close(model.heads_loss(states, pos, valid), want, ulps=SOFTMAX_ULPS)
        assert_beyond_rounding(want - rank_loss(model.fuser.ranker(h, iv), pos["image"], iv), want, ulps=SOFTMAX_ULPS)
    assert set(model.heads()) == {"image_ranker", "text_ranker", "fuser"}
    assert len(build(False, "sum").heads()) == 0


# --------------------------------------------------------------------------- a trained run


def test_a_trained_tiny_run_has_its_heads_and_loads_back_identically(trained_run):
    cfg = json.loads((trained_run.run / "config.json").read_text())
    assert cfg["fusion"]["method"] == "orderer" and cfg["orderer"]["rank_head"] is True
    m1, _ = load_run(trained_run.run)
    m2, _ = load_run(trained_run.run)
    assert m1.fuser is not None and m1.image.ranker is not None
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    trained = [k for k in s1 if k.startswith(("fuser.", "image.ranker.", "text.ranker."))]
    untrained = IterWeGO(m1.cfg, m1.image_encoder, m1.text_encoder).state_dict()
    assert trained and any(not torch.equal(s1[k], untrained[k]) for k in trained)  # the stage ran and was saved


def test_the_papers_decoding_stays_selectable_at_load_time(trained_run, tmp_path):
    plain, _ = load_run(trained_run.run, overrides=["fusion.method=sum", "orderer.rank_head=false"])
    assert plain.fuser is None and plain.image.ranker is None
    full, _ = load_run(trained_run.run)
    shared = plain.state_dict()
    assert all(torch.equal(shared[k], full.state_dict()[k]) for k in shared)  # the same orderers and aligner


def test_a_run_without_a_fused_orderer_refuses_one_with_a_clear_message(trained_run, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run)
    state = {k: v for k, v in load_file(str(run / "model.safetensors")).items() if not k.startswith("fuser.")}
    save_file(state, str(run / "model.safetensors"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["fusion"]["method"] = "sum"
    (run / "config.json").write_text(json.dumps(cfg))
    assert load_run(run)[0].fuser is None
    with pytest.raises(ModelLoadError, match=r"no fused orderer.*fusion.method=sum"):
        load_run(run, overrides=["fusion.method=orderer"])


def build_ensemble(k: int = 3) -> IterWeGO:
    cfg = build(True, "orderer").cfg.override([f"fusion.ensemble={k}"])
    torch.manual_seed(0)  # as build() seeds
    return IterWeGO(cfg, stand_in("image", D_IMG), stand_in("text", D_TXT)).eval()


def test_an_ensemble_of_fused_orderers_whose_first_member_initialises_as_the_single_one():
    """fusion.ensemble=K: K fused orderers; the first initialises as the single one would, nothing else moves,
    and the members differ."""
    from iterwego.model import FusedEnsemble

    single, many = build(True, "orderer"), build_ensemble(3)
    assert isinstance(many.fuser, FusedEnsemble) and len(many.fuser) == 3
    s1, s3 = single.state_dict(), many.state_dict()
    assert all(torch.equal(v, s3[k]) for k, v in s1.items() if not k.startswith("fuser."))
    assert all(torch.equal(v, s3["fuser.0." + k[len("fuser.") :]]) for k, v in s1.items() if k.startswith("fuser."))
    assert not torch.equal(s3["fuser.0.proj.weight"], s3["fuser.1.proj.weight"])


def test_the_ensemble_forward_and_loss_are_the_members_mean_and_sum(batch):
    model = build_ensemble(3)
    with torch.no_grad():
        fw = model(batch, 0)
        states = {m: model.orderer(m).states(batch.feats[m], batch.index[m]) for m in ("image", "text")}
        iv = batch.valid("image")
        outs = [m(states["image"], states["text"], fw.pairing, iv) for m in model.fuser]
    logits = torch.stack([lg for lg, _ in outs])
    assert_float32_close(fw.fused, logits.mean(0), ulps=REFERENCE_ULPS)
    assert_beyond_rounding(fw.fused - logits[0], logits.mean(0), ulps=REFERENCE_ULPS)  # not one member
    probs = torch.stack([r.exp() for _, r in outs]).mean(0)
    assert_float32_close(within(fw.ranks["fused"].exp()), within(probs), ulps=SOFTMAX_ULPS)
    valid = {m: batch.valid(m) for m in ("image", "text")}
    pairing = gold_pairing(batch.pos["image"], batch.pos["text"], iv, valid["text"])
    with torch.no_grad():
        members = sum(
            sum(m.losses(states["image"], states["text"], pairing, batch.pos["image"], iv)) for m in model.fuser
        )
        ranks = sum(rank_loss(model.orderer(m).ranker(states[m], valid[m]), batch.pos[m], valid[m]) for m in valid)
        got = model.heads_loss(states, batch.pos, valid)
    assert_float32_close(got, members + ranks, ulps=SOFTMAX_ULPS)  # the same 5 sums, added in another order
    assert_beyond_rounding(got - members / 3, members + ranks, ulps=SOFTMAX_ULPS)  # every member's loss counts


def test_fusion_sum_weight_adds_the_product_of_both_pair_experts(batch):
    """fusion.sum_weight=W: the fused orderer's logits plus W times 0.2's sum of both round-0 log-odds."""
    from iterwego.fusion import fuse_logits

    plain = build(True, "orderer")
    plus = build(True, "orderer")
    plus.cfg = plus.cfg.override(["fusion.sum_weight=0.5"])
    with torch.no_grad():
        a, b = plain(batch, 0), plus(batch, 0)
    want = a.fused + 0.5 * fuse_logits(a.image[0], a.text[0], a.pairing)
    assert_float32_close(b.fused, want, ulps=REFERENCE_ULPS)
    assert_beyond_rounding(b.fused - a.fused, want, ulps=REFERENCE_ULPS)
