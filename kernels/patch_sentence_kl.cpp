// Torch bindings and input checks for the fused patch-sentence KL (kernels/patch_sentence_kl_kernel.cu).
//
//   KL_i = sum_j q_ij (a_ij - b_ij) - LSE_j(a_ij) + LSE_j(b_ij),
//   a = teacher T^T / tau_t (stop-gradient), b = student T^T / tau_s, q = softmax(a), p = softmax(b)
//   dKL/dstudent_i = (g_i / tau_s) sum_j (p_ij - q_ij) T_j
//   dKL/dT_j       = sum_i (g_i / tau_s) (p_ij - q_ij) student_i
//
// forward(student, teacher, prototypes, inv_tau_s, inv_tau_t) -> (loss fp32 [P], lse2_a fp32 [P], lse2_b fp32 [P])
//   (the LSEs are in base 2: lse2 = LSE / ln 2; they are only meant to be passed back to backward)
// backward(grad fp32 [P], student, teacher, prototypes, lse2_a, lse2_b, inv_tau_s, inv_tau_t, need_dprototypes,
//          deterministic) -> (dstudent fp32 [P, D], dprototypes fp32 [M, D] or an empty tensor)
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> psk_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                         const at::Tensor& prototypes, double inv_tau_s, double inv_tau_t);
std::vector<at::Tensor> psk_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& prototypes, const at::Tensor& lse_a,
                                          const at::Tensor& lse_b, double inv_tau_s, double inv_tau_t,
                                          bool need_dprototypes, bool deterministic);

namespace {

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& prototypes) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda() && prototypes.is_cuda(),
              "patch_sentence_kl: all inputs must be CUDA tensors");
  TORCH_CHECK(student.device() == teacher.device() && student.device() == prototypes.device(),
              "patch_sentence_kl: inputs must be on the same device");
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2 && prototypes.dim() == 2,
              "patch_sentence_kl: expected 2-D student [P,D], teacher [P,D], prototypes [M,D]");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "patch_sentence_kl: student and teacher shapes differ");
  TORCH_CHECK(student.size(1) == prototypes.size(1), "patch_sentence_kl: feature dims differ");
  TORCH_CHECK(prototypes.size(0) >= 1, "patch_sentence_kl: needs at least one prototype");
  const auto dt = student.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "patch_sentence_kl: dtype must be float32, float16 or bfloat16 (float64: use backend='streaming')");
  TORCH_CHECK(teacher.scalar_type() == dt && prototypes.scalar_type() == dt,
              "patch_sentence_kl: student, teacher and prototypes must share a dtype");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous() && prototypes.is_contiguous(),
              "patch_sentence_kl: inputs must be contiguous");
  TORCH_CHECK(student.size(0) < (1LL << 31) && prototypes.size(0) < (1LL << 31) && student.size(1) < (1LL << 31),
              "patch_sentence_kl: dimensions must fit in int32");
}

void check_row_vector(const at::Tensor& x, int64_t P, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kFloat && x.dim() == 1 && x.size(0) == P && x.is_contiguous(),
              "patch_sentence_kl: ", name, " must be a contiguous float32 CUDA tensor of shape [P]");
}

std::vector<at::Tensor> forward(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& prototypes,
                                double inv_tau_s, double inv_tau_t) {
  check_inputs(student, teacher, prototypes);
  TORCH_CHECK(inv_tau_s > 0 && inv_tau_t > 0, "patch_sentence_kl: temperatures must be positive");
  return psk_forward_cuda(student, teacher, prototypes, inv_tau_s, inv_tau_t);
}

std::vector<at::Tensor> backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                 const at::Tensor& prototypes, const at::Tensor& lse_a, const at::Tensor& lse_b,
                                 double inv_tau_s, double inv_tau_t, bool need_dprototypes, bool deterministic) {
  check_inputs(student, teacher, prototypes);
  const int64_t P = student.size(0);
  check_row_vector(grad, P, "grad");
  check_row_vector(lse_a, P, "lse_a");
  check_row_vector(lse_b, P, "lse_b");
  return psk_backward_cuda(grad, student, teacher, prototypes, lse_a, lse_b, inv_tau_s, inv_tau_t,
                           need_dprototypes, deterministic);
}

}  // namespace

// Build stamp (set by rils_scale/ops/_extension.py and setup.py): the loader refuses a module whose
// sources or target archs do not match the tree it runs with.
// Both are bare tokens (-DRILS_SOURCE_HASH=96cc0608..., -DRILS_CUDA_ARCHS=80_90), stringified here, so
// no build system has to carry quotes through a shell.
#ifndef RILS_SOURCE_HASH
#define RILS_SOURCE_HASH unknown
#endif
#ifndef RILS_CUDA_ARCHS
#define RILS_CUDA_ARCHS unknown
#endif
#define RILS_STR2(x) #x
#define RILS_STR(x) RILS_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rils_scale fused patch-sentence KL (online softmax over prototypes, no P x M tensor in memory)";
  m.attr("source_hash") = RILS_STR(RILS_SOURCE_HASH);
  m.attr("cuda_archs") = RILS_STR(RILS_CUDA_ARCHS);
  m.def("forward", &forward, "loss, lse2_a, lse2_b = forward(student, teacher, prototypes, 1/tau_s, 1/tau_t)",
        pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("prototypes"), pybind11::arg("inv_tau_s"),
        pybind11::arg("inv_tau_t"));
  m.def("backward", &backward,
        "dstudent, dprototypes = backward(grad, student, teacher, prototypes, lse2_a, lse2_b, 1/tau_s, 1/tau_t, "
        "need_dprototypes, deterministic)",
        pybind11::arg("grad"), pybind11::arg("student"), pybind11::arg("teacher"), pybind11::arg("prototypes"),
        pybind11::arg("lse_a"), pybind11::arg("lse_b"), pybind11::arg("inv_tau_s"), pybind11::arg("inv_tau_t"),
        pybind11::arg("need_dprototypes"), pybind11::arg("deterministic"));
}
