"""Pure loss functions: standard, certified (IBP, CROWN-IBP, SABR, MTL-IBP, CC-IBP, Exp-IBP), distillation."""
from certdist.losses.certified import (cc_ibp_loss, ce_of_margins, exp_ibp_loss, ibp_loss, logit_differences,
                                       mix_bounds, mtl_ibp_loss, standard_loss)
from certdist.losses.distillation import (FEATURE_SCALINGS, apply_scaling, box_decomposition,
                                          convex_combination_box, default_beta, distillation_loss,
                                          point_distance_loss, scaling_statistics, soft_label_kl,
                                          worst_case_sq_distance)

__all__ = ["FEATURE_SCALINGS", "apply_scaling", "box_decomposition", "point_distance_loss", "scaling_statistics",
           "soft_label_kl", "cc_ibp_loss", "ce_of_margins", "convex_combination_box", "default_beta", "distillation_loss",
           "exp_ibp_loss", "ibp_loss", "logit_differences", "mix_bounds", "mtl_ibp_loss", "standard_loss",
           "worst_case_sq_distance"]
