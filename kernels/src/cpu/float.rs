//! The [`Float`] trait that lets every CPU kernel run in f32 (training) and f64 (gradient
//! checks), and the bounds-checked wrapper around matrixmultiply's GEMM.

/// A floating-point element type the CPU kernels can run in: f32 for training, f64 so backward
/// passes can be checked against finite differences.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::NumAssignOps
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + 'static
{
    /// Converts an f64 constant to `Self`, rounding to nearest when `Self` is narrower.
    fn lit(x: f64) -> Self;

    /// `c = alpha · a · b + beta · c` with `a` (m,k), `b` (k,n) and `c` (m,n), through
    /// matrixmultiply (which is deterministic whatever its thread count). When `beta` is zero,
    /// `c` is overwritten without being read. Panics if a view does not fit in its slice or if
    /// `c`'s strides make two of its elements share memory.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        beta: Self,
        c: MatMut<'_, Self>,
    );
}

/// A read-only strided matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, F> {
    data: &'a [F],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, F> MatRef<'a, F> {
    /// Views `data` as a row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [F], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view; no data moves.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// A writable strided matrix view: element (i, j) is `data[i * row_stride + j * col_stride]`.
#[derive(Debug)]
pub struct MatMut<'a, F> {
    data: &'a mut [F],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, F> MatMut<'a, F> {
    /// Views `data` as a row-major matrix with `cols` columns.
    pub fn row_major(data: &'a mut [F], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of this view; no data moves.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Asserts that a `rows` x `cols` view with the given strides stays inside a slice of `len`.
fn assert_fits(what: &str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) {
    assert!(
        rs <= isize::MAX as usize && cs <= isize::MAX as usize,
        "gemm: {what} has strides ({rs}, {cs}) beyond isize::MAX"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(r, c)| r.checked_add(c));
    assert!(
        matches!(last, Some(last) if last < len),
        "gemm: {what} ({rows}x{cols}, strides ({rs}, {cs})) does not fit in a slice of {len}"
    );
}

/// Asserts that no two elements of a `rows` x `cols` view with the given strides share memory,
/// so that matrixmultiply's threads never write the same element.
fn assert_distinct(rows: usize, cols: usize, rs: usize, cs: usize) {
    let distinct = match (rows, cols) {
        (0, _) | (_, 0) | (1, 1) => true,
        (1, _) => cs >= 1,
        (_, 1) => rs >= 1,
        _ => {
            (cs >= 1 && rs >= cols.saturating_mul(cs)) || (rs >= 1 && cs >= rows.saturating_mul(rs))
        }
    };
    assert!(
        distinct,
        "gemm: output strides ({rs}, {cs}) make elements of a {rows}x{cols} matrix overlap"
    );
}

/// Checks every precondition matrixmultiply relies on for `c (m,n) = a (m,k) · b (k,n)`.
fn check_gemm<F>(
    m: usize,
    k: usize,
    n: usize,
    a: &MatRef<'_, F>,
    b: &MatRef<'_, F>,
    c: &MatMut<'_, F>,
) {
    assert_fits("a", a.data.len(), m, k, a.row_stride, a.col_stride);
    assert_fits("b", b.data.len(), k, n, b.row_stride, b.col_stride);
    assert_fits("c", c.data.len(), m, n, c.row_stride, c.col_stride);
    assert_distinct(m, n, c.row_stride, c.col_stride);
}

impl Float for f32 {
    fn lit(x: f64) -> Self {
        x as f32
    }

    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        beta: f32,
        c: MatMut<'_, f32>,
    ) {
        check_gemm(m, k, n, &a, &b, &c);
        // SAFETY: check_gemm asserted that every element each view can reach lies inside its
        // slice, that the strides fit in isize, and that c's elements are pairwise distinct. The
        // `&mut` borrow behind `c` guarantees that neither `a` nor `b` aliases it.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha,
                a.data.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
                beta,
                c.data.as_mut_ptr(),
                c.row_stride as isize,
                c.col_stride as isize,
            );
        }
    }
}

impl Float for f64 {
    fn lit(x: f64) -> Self {
        x
    }

    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: MatRef<'_, f64>,
        b: MatRef<'_, f64>,
        beta: f64,
        c: MatMut<'_, f64>,
    ) {
        check_gemm(m, k, n, &a, &b, &c);
        // SAFETY: check_gemm asserted that every element each view can reach lies inside its
        // slice, that the strides fit in isize, and that c's elements are pairwise distinct. The
        // `&mut` borrow behind `c` guarantees that neither `a` nor `b` aliases it.
        unsafe {
            matrixmultiply::dgemm(
                m,
                k,
                n,
                alpha,
                a.data.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
                beta,
                c.data.as_mut_ptr(),
                c.row_stride as isize,
                c.col_stride as isize,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    //! The GEMM wrapper's orientation handling and bounds checks.

    use super::*;

    #[test]
    fn gemm_handles_transposed_views_and_accumulates() {
        // a (2,3) row-major; b given as the (2,3) row-major transpose of a (3,2) matrix.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut c = [10.0; 4];
        f64::gemm(
            2,
            3,
            2,
            1.0,
            MatRef::row_major(&a, 3),
            MatRef::row_major(&bt, 3).t(),
            1.0,
            MatMut::row_major(&mut c, 2),
        );
        assert_eq!(c, [10.0 - 2.0, 10.0 + 4.0, 10.0 - 2.0, 10.0 + 13.0]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn gemm_rejects_a_short_slice() {
        let a = [1.0f32; 5];
        let b = [1.0f32; 6];
        let mut c = [0.0f32; 4];
        f32::gemm(
            2,
            3,
            2,
            1.0,
            MatRef::row_major(&a, 3),
            MatRef::row_major(&b, 2),
            0.0,
            MatMut::row_major(&mut c, 2),
        );
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn gemm_rejects_overlapping_output() {
        let a = [1.0f32; 6];
        let b = [1.0f32; 6];
        let mut c = [0.0f32; 4];
        let c = MatMut {
            data: &mut c,
            row_stride: 1,
            col_stride: 1,
        };
        f32::gemm(
            2,
            3,
            2,
            1.0,
            MatRef::row_major(&a, 3),
            MatRef::row_major(&b, 2),
            0.0,
            c,
        );
    }
}
