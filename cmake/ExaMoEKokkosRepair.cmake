# Repairs the CMake targets of distribution-packaged Kokkos / Kokkos Kernels so that
# `Kokkos::kokkos` and `Kokkos::kokkoskernels` work as they do for an upstream install.
#
# Debian's Trilinos 13.2 build of Kokkos 3.4 exports `Kokkos::kokkos` with an include
# directory of `<prefix>/lib/include` (the export computed its prefix one level too
# shallow) while the headers live in `Kokkos_INCLUDE_DIRS` (/usr/include/trilinos), and
# its Kokkos Kernels exports only the TriBITS target `trilinos_kokkoskernels`.
# Upstream Kokkos (>= 4.7) needs none of this: every step below is a no-op there.
# Nothing on the system is edited; only the imported targets in this CMake run change.

include_guard(GLOBAL)

function(_examoe_dir_has_header out header)
  set(found FALSE)
  foreach(d IN LISTS ARGN)
    if(EXISTS "${d}/${header}")
      set(found TRUE)
    endif()
  endforeach()
  set(${out} ${found} PARENT_SCOPE)
endfunction()

function(examoe_repair_kokkos)
  if(NOT TARGET Kokkos::kokkos)
    message(FATAL_ERROR "ExaMoE: find_package(Kokkos) did not define Kokkos::kokkos")
  endif()
  get_target_property(_inc Kokkos::kokkos INTERFACE_INCLUDE_DIRECTORIES)
  if(NOT _inc)
    set(_inc "")
  endif()
  _examoe_dir_has_header(_ok Kokkos_Core.hpp ${_inc})
  if(NOT _ok)
    set(_fixed "")
    foreach(d IN LISTS Kokkos_INCLUDE_DIRS)
      get_filename_component(d "${d}" REALPATH)
      list(APPEND _fixed "${d}")
    endforeach()
    _examoe_dir_has_header(_ok Kokkos_Core.hpp ${_fixed})
    if(NOT _ok)
      message(FATAL_ERROR "ExaMoE: Kokkos::kokkos points at '${_inc}' and Kokkos_INCLUDE_DIRS "
                          "('${Kokkos_INCLUDE_DIRS}') holds no Kokkos_Core.hpp either; "
                          "set Kokkos_ROOT to a working Kokkos install")
    endif()
    set_property(TARGET Kokkos::kokkos PROPERTY INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
    # TriBITS put a compile definition among the link libraries; keep only real libraries.
    get_target_property(_libs Kokkos::kokkos INTERFACE_LINK_LIBRARIES)
    list(FILTER _libs EXCLUDE REGEX "^-D")
    set_property(TARGET Kokkos::kokkos PROPERTY INTERFACE_LINK_LIBRARIES "${_libs}")
    message(STATUS "ExaMoE: repaired Kokkos::kokkos include directory -> ${_fixed}")
  endif()
endfunction()

function(examoe_repair_kokkoskernels)
  if(TARGET Kokkos::kokkoskernels)
    return()
  endif()
  if(TARGET trilinos_kokkoskernels)
    add_library(Kokkos::kokkoskernels INTERFACE IMPORTED GLOBAL)
    set(_fixed "")
    foreach(d IN LISTS KokkosKernels_INCLUDE_DIRS)
      get_filename_component(d "${d}" REALPATH)
      list(APPEND _fixed "${d}")
    endforeach()
    set_target_properties(Kokkos::kokkoskernels PROPERTIES
      INTERFACE_LINK_LIBRARIES "trilinos_kokkoskernels;Kokkos::kokkos"
      INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
    message(STATUS "ExaMoE: defined Kokkos::kokkoskernels on top of trilinos_kokkoskernels")
  else()
    message(FATAL_ERROR "ExaMoE: find_package(KokkosKernels) defined neither Kokkos::kokkoskernels "
                        "nor trilinos_kokkoskernels")
  endif()
endfunction()
