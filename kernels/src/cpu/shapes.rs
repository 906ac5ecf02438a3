//! The shape checks of every kernel, on lengths rather than slices so that the CPU kernels and
//! the CUDA ops on device views (`crate::cuda`) assert exactly the same things with the same
//! messages. Each function takes the lengths of its kernel's tensors in the kernel's argument
//! order, followed by the kernel's dimensions, and panics naming the kernel and the argument
//! whose length is wrong.
//!
//! Checks that need the values (tokens and targets in range) stay with the CPU kernels: the
//! CUDA ops keep their ids on the device.

use super::is_multiple;

/// encoder_forward: out (B,T,C), tokens (B,T), wte (Vp,C), wpe (maxT,C) with maxT >= T.
/// Returns Vp.
pub(crate) fn check_encoder_forward(
    out: usize,
    tokens: usize,
    wte: usize,
    wpe: usize,
    b: usize,
    t: usize,
    c: usize,
) -> usize {
    let n = b * t;
    assert!(c > 0, "encoder_forward: C must be positive");
    assert_eq!(out, n * c, "encoder_forward: out must be (B,T,C)");
    assert_eq!(tokens, n, "encoder_forward: tokens must be (B,T)");
    assert!(is_multiple(wte, c), "encoder_forward: wte must be (Vp,C)");
    assert!(
        is_multiple(wpe, c) && wpe >= t * c,
        "encoder_forward: wpe must be (maxT,C) with maxT >= T"
    );
    wte / c
}

/// encoder_backward: dwte (Vp,C), dwpe (maxT,C) with maxT >= T, dout (B,T,C), tokens (B,T).
/// Returns Vp.
pub(crate) fn check_encoder_backward(
    dwte: usize,
    dwpe: usize,
    dout: usize,
    tokens: usize,
    b: usize,
    t: usize,
    c: usize,
) -> usize {
    let n = b * t;
    assert!(c > 0, "encoder_backward: C must be positive");
    assert_eq!(dout, n * c, "encoder_backward: dout must be (B,T,C)");
    assert_eq!(tokens, n, "encoder_backward: tokens must be (B,T)");
    assert!(
        is_multiple(dwte, c),
        "encoder_backward: dwte must be (Vp,C)"
    );
    assert!(
        is_multiple(dwpe, c) && dwpe >= t * c,
        "encoder_backward: dwpe must be (maxT,C) with maxT >= T"
    );
    dwte / c
}

/// layernorm_forward: out and inp (N,C), mean and rstd (N), weight and bias (C).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_layernorm_forward(
    out: usize,
    mean: usize,
    rstd: usize,
    inp: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_forward: C must be positive");
    assert_eq!(out, n * c, "layernorm_forward: out must be (N,C)");
    assert_eq!(inp, n * c, "layernorm_forward: inp must be (N,C)");
    assert_eq!(mean, n, "layernorm_forward: mean must be (N)");
    assert_eq!(rstd, n, "layernorm_forward: rstd must be (N)");
    assert_eq!(weight, c, "layernorm_forward: weight must be (C)");
    assert_eq!(bias, c, "layernorm_forward: bias must be (C)");
}

/// layernorm_backward: dinp, dout and inp (N,C), dweight, dbias and weight (C), mean and rstd
/// (N).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_layernorm_backward(
    dinp: usize,
    dweight: usize,
    dbias: usize,
    dout: usize,
    inp: usize,
    weight: usize,
    mean: usize,
    rstd: usize,
    n: usize,
    c: usize,
) {
    assert!(c > 0, "layernorm_backward: C must be positive");
    assert_eq!(dinp, n * c, "layernorm_backward: dinp must be (N,C)");
    assert_eq!(dout, n * c, "layernorm_backward: dout must be (N,C)");
    assert_eq!(inp, n * c, "layernorm_backward: inp must be (N,C)");
    assert_eq!(dweight, c, "layernorm_backward: dweight must be (C)");
    assert_eq!(dbias, c, "layernorm_backward: dbias must be (C)");
    assert_eq!(weight, c, "layernorm_backward: weight must be (C)");
    assert_eq!(mean, n, "layernorm_backward: mean must be (N)");
    assert_eq!(rstd, n, "layernorm_backward: rstd must be (N)");
}

/// matmul_forward: out (N,OC), inp (N,C), weight (OC,C), bias (OC) when there is one.
pub(crate) fn check_matmul_forward(
    out: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert!(c > 0 && oc > 0, "matmul_forward: C and OC must be positive");
    assert_eq!(out, n * oc, "matmul_forward: out must be (N,OC)");
    assert_eq!(inp, n * c, "matmul_forward: inp must be (N,C)");
    assert_eq!(weight, oc * c, "matmul_forward: weight must be (OC,C)");
    if let Some(bias) = bias {
        assert_eq!(bias, oc, "matmul_forward: bias must be (OC)");
    }
}

/// matmul_backward: dinp (N,C), dweight (OC,C), dbias (OC) when there is one, dout (N,OC), inp
/// (N,C), weight (OC,C).
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_matmul_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    c: usize,
    oc: usize,
) {
    assert!(
        c > 0 && oc > 0,
        "matmul_backward: C and OC must be positive"
    );
    assert_eq!(dinp, n * c, "matmul_backward: dinp must be (N,C)");
    assert_eq!(dweight, oc * c, "matmul_backward: dweight must be (OC,C)");
    assert_eq!(dout, n * oc, "matmul_backward: dout must be (N,OC)");
    assert_eq!(inp, n * c, "matmul_backward: inp must be (N,C)");
    assert_eq!(weight, oc * c, "matmul_backward: weight must be (OC,C)");
    if let Some(dbias) = dbias {
        assert_eq!(dbias, oc, "matmul_backward: dbias must be (OC)");
    }
}

/// The checks shared by the attention kernels: positive dimensions, NH dividing C, and the
/// packed q,k,v input (B,T,3C).
fn check_attention_dims(what: &str, qkv: usize, b: usize, t: usize, c: usize, nh: usize) {
    assert!(
        t > 0 && c > 0 && nh > 0,
        "{what}: T, C and NH must be positive"
    );
    assert!(
        is_multiple(c, nh),
        "{what}: C = {c} is not a multiple of NH = {nh}"
    );
    assert_eq!(qkv, b * t * 3 * c, "{what}: inp must be (B,T,3C)");
}

/// attention_forward: out (B,T,C), preatt and att (B,NH,T,T), inp (B,T,3C); NH divides C.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_attention_forward(
    out: usize,
    preatt: usize,
    att: usize,
    inp: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    check_attention_dims("attention_forward", inp, b, t, c, nh);
    assert_eq!(out, b * t * c, "attention_forward: out must be (B,T,C)");
    assert_eq!(
        preatt,
        b * nh * t * t,
        "attention_forward: preatt must be (B,NH,T,T)"
    );
    assert_eq!(
        att,
        b * nh * t * t,
        "attention_forward: att must be (B,NH,T,T)"
    );
}

/// attention_backward: dinp (B,T,3C), dpreatt and datt (B,NH,T,T), dout (B,T,C), inp (B,T,3C),
/// att (B,NH,T,T); NH divides C.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_attention_backward(
    dinp: usize,
    dpreatt: usize,
    datt: usize,
    dout: usize,
    inp: usize,
    att: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) {
    check_attention_dims("attention_backward", inp, b, t, c, nh);
    assert_eq!(
        dinp,
        b * t * 3 * c,
        "attention_backward: dinp must be (B,T,3C)"
    );
    assert_eq!(dout, b * t * c, "attention_backward: dout must be (B,T,C)");
    for (name, len) in [("dpreatt", dpreatt), ("datt", datt), ("att", att)] {
        assert_eq!(
            len,
            b * nh * t * t,
            "attention_backward: {name} must be (B,NH,T,T)"
        );
    }
}

/// gelu_forward: out and inp of the same length.
pub(crate) fn check_gelu_forward(out: usize, inp: usize) {
    assert_eq!(
        out, inp,
        "gelu_forward: out and inp must have the same length"
    );
}

/// gelu_backward: dinp, inp and dout of the same length.
pub(crate) fn check_gelu_backward(dinp: usize, inp: usize, dout: usize) {
    assert_eq!(
        dinp, inp,
        "gelu_backward: dinp and inp must have the same length"
    );
    assert_eq!(
        dout, inp,
        "gelu_backward: dout and inp must have the same length"
    );
}

/// residual_forward: out, a and b of the same length.
pub(crate) fn check_residual_forward(out: usize, a: usize, b: usize) {
    assert_eq!(
        out, a,
        "residual_forward: out and a must have the same length"
    );
    assert_eq!(
        out, b,
        "residual_forward: out and b must have the same length"
    );
}

/// residual_backward: da, db and dout of the same length.
pub(crate) fn check_residual_backward(da: usize, db: usize, dout: usize) {
    assert_eq!(
        da, dout,
        "residual_backward: da and dout must have the same length"
    );
    assert_eq!(
        db, dout,
        "residual_backward: db and dout must have the same length"
    );
}

/// The checks shared by the softmax kernels: 0 < V <= Vp and logits (N,Vp).
fn check_softmax_dims(what: &str, logits: usize, n: usize, v: usize, vp: usize) {
    assert!(
        v > 0 && v <= vp,
        "{what}: need 0 < V <= Vp, got V = {v}, Vp = {vp}"
    );
    assert_eq!(logits, n * vp, "{what}: logits must be (N,Vp)");
}

/// softmax_forward: probs and logits (N,Vp), 0 < V <= Vp.
pub(crate) fn check_softmax_forward(probs: usize, logits: usize, n: usize, v: usize, vp: usize) {
    check_softmax_dims("softmax_forward", logits, n, v, vp);
    assert_eq!(probs, n * vp, "softmax_forward: probs must be (N,Vp)");
}

/// softmax_crossentropy_forward: losses (N), logits (N,Vp), targets (N), 0 < V <= Vp.
pub(crate) fn check_softmax_crossentropy_forward(
    losses: usize,
    logits: usize,
    targets: usize,
    n: usize,
    v: usize,
    vp: usize,
) {
    check_crossentropy(
        "softmax_crossentropy_forward",
        logits,
        losses,
        targets,
        n,
        v,
        vp,
    );
}

/// softmax_crossentropy_backward: logits_to_dlogits (N,Vp), losses (N), targets (N),
/// 0 < V <= Vp.
pub(crate) fn check_softmax_crossentropy_backward(
    logits_to_dlogits: usize,
    losses: usize,
    targets: usize,
    n: usize,
    v: usize,
    vp: usize,
) {
    check_crossentropy(
        "softmax_crossentropy_backward",
        logits_to_dlogits,
        losses,
        targets,
        n,
        v,
        vp,
    );
}

/// The checks of both cross-entropy kernels.
fn check_crossentropy(
    what: &str,
    logits: usize,
    losses: usize,
    targets: usize,
    n: usize,
    v: usize,
    vp: usize,
) {
    check_softmax_dims(what, logits, n, v, vp);
    assert_eq!(targets, n, "{what}: targets must be (N)");
    assert_eq!(losses, n, "{what}: losses must be (N)");
}

/// adamw_update: grads, m and v as long as params; a 1-based step.
pub(crate) fn check_adamw_update(params: usize, grads: usize, m: usize, v: usize, step: u64) {
    assert_eq!(grads, params, "adamw_update: grads must match params");
    assert_eq!(m, params, "adamw_update: m must match params");
    assert_eq!(v, params, "adamw_update: v must match params");
    assert!(step >= 1, "adamw_update: step is 1-based, got 0");
}
