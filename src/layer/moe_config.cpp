#include <examoe/error.hpp>
#include <examoe/metrics.hpp>
#include <examoe/moe_config.hpp>

#include <cmath>
#include <cstring>
#include <sstream>

namespace examoe {

std::string to_string(Activation a) { return a == Activation::gelu ? "gelu" : "swiglu"; }

const char* to_string(ExpertTensor t) {
  switch (t) {
    case ExpertTensor::w1: return "w1";
    case ExpertTensor::w2: return "w2";
    case ExpertTensor::w3: return "w3";
  }
  return "?";
}

const char* to_string(DispatchDtype t) { return t == DispatchDtype::bf16 ? "bf16" : "scalar"; }

DispatchDtype dispatch_dtype_from_string(const std::string& s) {
  if (s == "scalar") return DispatchDtype::scalar;
  if (s == "bf16") return DispatchDtype::bf16;
  throw Error("examoe::dispatch_dtype_from_string: unknown dispatch dtype '" + s + "' (scalar or bf16)");
}

const char* to_string(ExpertSchedule s) {
  switch (s) {
    case ExpertSchedule::automatic: return "auto";
    case ExpertSchedule::by_projection: return "by-projection";
    case ExpertSchedule::by_expert: return "by-expert";
  }
  return "?";
}

ExpertSchedule expert_schedule_from_string(const std::string& s) {
  if (s == "auto") return ExpertSchedule::automatic;
  if (s == "by-projection") return ExpertSchedule::by_projection;
  if (s == "by-expert") return ExpertSchedule::by_expert;
  throw Error("examoe::expert_schedule_from_string: unknown expert schedule '" + s + "' (auto, by-projection or by-expert)");
}

const char* to_string(RouterScore s) { return s == RouterScore::sigmoid ? "sigmoid" : "softmax"; }

RouterScore router_score_from_string(const std::string& s) {
  if (s == "softmax") return RouterScore::softmax;
  if (s == "sigmoid") return RouterScore::sigmoid;
  throw Error("examoe::router_score_from_string: unknown router score '" + s + "' (softmax or sigmoid)");
}

Activation activation_from_string(const std::string& s) {
  if (s == "gelu") return Activation::gelu;
  if (s == "swiglu") return Activation::swiglu;
  throw Error("examoe::activation_from_string: unknown activation '" + s +
              "' (expected gelu or swiglu)");
}

void MoEConfig::validate() const {
  const std::string f = "examoe::MoEConfig::validate: ";
  auto positive = [&](const char* name, long long v) {
    if (v <= 0) throw Error(f + name + " must be positive (got " + std::to_string(v) + ")");
  };
  positive("d_model", d_model);
  positive("d_hidden", d_hidden);
  positive("num_experts", num_experts);
  if (top_k < 1 || top_k > num_experts)
    throw Error(f + "top_k (" + std::to_string(top_k) + ") must be in [1, num_experts = " +
                std::to_string(num_experts) + "]");
  if (!(router.temperature > 0) || !std::isfinite(router.temperature))
    throw Error(f + "router.temperature must be a positive finite number (got " +
                std::to_string(router.temperature) + ")");
  if (!(router.jitter >= 0) || !std::isfinite(router.jitter))
    throw Error(f + "router.jitter must be >= 0 (got " + std::to_string(router.jitter) + ")");
  if (!(router.aux_loss_coef >= 0) || !std::isfinite(router.aux_loss_coef))
    throw Error(f + "router.aux_loss_coef must be >= 0 (got " +
                std::to_string(router.aux_loss_coef) + ")");
  if (!(router.z_loss_coef >= 0) || !std::isfinite(router.z_loss_coef))
    throw Error(f + "router.z_loss_coef must be >= 0 (got " + std::to_string(router.z_loss_coef) +
                ")");
  if (!(router.bias_rate >= 0) || !std::isfinite(router.bias_rate))
    throw Error(f + "router.bias_rate must be >= 0 (got " + std::to_string(router.bias_rate) + ")");
  if (router.groups < 0 || router.groups > num_experts)
    throw Error(f + "router.groups (" + std::to_string(router.groups) + ") must be in [0, num_experts = " +
                std::to_string(num_experts) + "] (0 = the expert-parallel ranks)");
  if (router.topk_groups < 0 || (router.groups > 0 && router.topk_groups > router.groups))
    throw Error(f + "router.topk_groups (" + std::to_string(router.topk_groups) + ") must be in [0, router.groups = " +
                std::to_string(router.groups) + "] (0 = no group limit)");
  if (router.groups > 0 && router.topk_groups > 0 &&
      top_k > router.topk_groups * (num_experts / router.groups))
    throw Error(f + "top_k (" + std::to_string(top_k) + ") exceeds the experts of router.topk_groups = " +
                std::to_string(router.topk_groups) + " of the smallest groups (" +
                std::to_string(num_experts / router.groups) + " experts each of " + std::to_string(router.groups) +
                " groups)");
  if (!(capacity_factor >= 0) || !std::isfinite(capacity_factor))
    throw Error(f + "capacity_factor must be >= 0 and finite (0 = dropless; got " +
                std::to_string(capacity_factor) + ")");
  if (!placement.empty() && static_cast<int>(placement.size()) != num_experts)
    throw Error(f + "placement has " + std::to_string(placement.size()) +
                " entries but num_experts is " + std::to_string(num_experts));
}

namespace {
struct Fnv {
  std::uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    for (std::size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  }
  template <class T>
  void add(const T& v) { bytes(&v, sizeof(v)); }
};
}  // namespace

std::uint64_t MoEConfig::hash() const {
  Fnv f;
  f.add(d_model); f.add(d_hidden); f.add(num_experts); f.add(top_k);
  f.add(static_cast<int>(activation));
  f.add(router.temperature); f.add(router.renormalize); f.add(router.jitter);
  f.add(router.seed); f.add(router.aux_loss_coef); f.add(router.z_loss_coef);
  f.add(static_cast<int>(router.score)); f.add(router.bias_rate); f.add(router.groups); f.add(router.topk_groups);
  f.add(placement.size());
  for (int o : placement) f.add(o);
  f.add(reduce_router_grad);
  f.add(check_finite_inputs);
  f.add(allow_tf32);
  f.add(static_cast<int>(dispatch_dtype));
  f.add(overlap_exchange);
  f.add(static_cast<int>(expert_schedule));
  f.add(capacity_factor);
  return f.h;
}

std::string MoEConfig::to_string() const {
  std::ostringstream os;
  os.precision(17);
  os << "d_model=" << d_model << "\nd_hidden=" << d_hidden << "\nnum_experts=" << num_experts
     << "\ntop_k=" << top_k << "\nactivation=" << examoe::to_string(activation)
     << "\nrouter.temperature=" << router.temperature
     << "\nrouter.renormalize=" << router.renormalize << "\nrouter.jitter=" << router.jitter
     << "\nrouter.seed=" << router.seed << "\nrouter.aux_loss_coef=" << router.aux_loss_coef
     << "\nrouter.z_loss_coef=" << router.z_loss_coef << "\nrouter.score=" << examoe::to_string(router.score)
     << "\nrouter.bias_rate=" << router.bias_rate << "\nrouter.groups=" << router.groups
     << "\nrouter.topk_groups=" << router.topk_groups << "\nplacement=";
  for (std::size_t i = 0; i < placement.size(); ++i) os << (i ? "," : "") << placement[i];
  os << "\nreduce_router_grad=" << reduce_router_grad << "\ncheck_finite_inputs=" << check_finite_inputs
     << "\nallow_tf32=" << allow_tf32 << "\ndispatch_dtype=" << examoe::to_string(dispatch_dtype)
     << "\noverlap_exchange=" << overlap_exchange << "\nexpert_schedule=" << examoe::to_string(expert_schedule)
     << "\ncapacity_factor=" << capacity_factor << "\n";
  return os.str();
}

const char* phase_name(Phase p) {
  switch (p) {
    case Phase::router: return "router";
    case Phase::plan: return "plan";
    case Phase::pack: return "pack";
    case Phase::alltoall: return "alltoall";
    case Phase::experts: return "experts";
    case Phase::combine: return "combine";
    case Phase::bwd_combine: return "bwd_combine";
    case Phase::bwd_alltoall: return "bwd_alltoall";
    case Phase::bwd_experts: return "bwd_experts";
    case Phase::bwd_router: return "bwd_router";
    case Phase::count: break;
  }
  return "?";
}

}  // namespace examoe
