//! `nimmer loras train`'s trainer on the real Driver weights: a few steps lower the reply loss, and the adapter it
//! writes (f16 PEFT) loads back against the model and changes its output.

use nimmer_loras::{StoreAs, load_peft, save_peft_as};
use nimmer_tiers::llama::train::{Example, TrainOptions, Trainer};

#[test]
fn training_lowers_the_loss_and_saves_a_loadable_adapter() {
    let examples = vec![
        Example {
            system: Some("You are Mara, a fishmonger in the harbor district.".into()),
            user: "Where can I find the blacksmith?".into(),
            reply: "East gate. Follow the smoke.".into(),
        },
        Example {
            system: Some("You are Tomas, a guard at the north gate.".into()),
            user: "What time does the market close?".into(),
            reply: "Sundown.".into(),
        },
    ];
    let mut t = Trainer::new(
        &nimmer_e2e::driver_gguf(),
        TrainOptions {
            rank: 4,
            alpha: 8.0,
            modules: vec![
                nimmer_loras::Module::Q,
                nimmer_loras::Module::V,
                nimmer_loras::Module::Down,
            ],
            steps: 6,
            batch: 2,
            lr: 5e-3,
            seed: 1,
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    t.train(&examples, |r| losses.push(r.loss)).unwrap();
    assert_eq!(losses.len(), 6);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(losses[5] < 0.5 * losses[0], "loss did not fall: {losses:?}");
    let adapter = t.adapter("quick").unwrap();
    assert_eq!((adapter.rank, adapter.modules.len()), (4, 3));
    let dir = tempfile::tempdir().unwrap();
    save_peft_as(&adapter, &t.base(), dir.path(), StoreAs::F16).unwrap();
    let back = load_peft(dir.path(), "quick", &t.base()).unwrap();
    // f16 storage: each value within f16's relative precision.
    for (l0, l1) in adapter.layers.iter().zip(&back.layers) {
        for (p0, p1) in l0.iter().zip(l1) {
            let (p0, p1) = (p0.as_ref().unwrap(), p1.as_ref().unwrap());
            for (a, b) in p0.a.iter().chain(&p0.b).zip(p1.a.iter().chain(&p1.b)) {
                assert!((a - b).abs() <= 1e-3 * a.abs().max(1e-2), "{a} vs {b}");
            }
        }
    }
    // The saved adapter changes the Driver's greedy reply to a training prompt.
    let h = nimmer_e2e::driver();
    let params = nimmer_tiers::SamplingParams {
        max_tokens: 12,
        ..Default::default()
    };
    let base = nimmer_e2e::run(
        h,
        nimmer_e2e::chat(
            examples[1].system.as_deref().unwrap(),
            &examples[1].user,
            params.clone(),
        ),
    );
    let mut req = nimmer_e2e::chat(
        examples[1].system.as_deref().unwrap(),
        &examples[1].user,
        params,
    );
    req.lora = Some(std::sync::Arc::new(nimmer_loras::Blend {
        parts: vec![(std::sync::Arc::new(back), 1.0)],
    }));
    let tuned = nimmer_e2e::run(h, req);
    assert_ne!(
        base.tokens, tuned.tokens,
        "{:?} vs {:?}",
        base.text, tuned.text
    );
}
