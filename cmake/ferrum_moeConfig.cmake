# ferrum_moe CMake package: the plugin headers as the target ferrum_moe::headers.
# Installed as <site-packages>/ferrum_moe/cmake/; found through
# `python -c "import ferrum_moe; print(ferrum_moe.get_cmake_dir())"` or
# scikit-build-core's cmake.root entry point.
get_filename_component(_ferrum_moe_prefix "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
set(ferrum_moe_INCLUDE_DIR "${_ferrum_moe_prefix}/include")
if(NOT TARGET ferrum_moe::headers)
  add_library(ferrum_moe::headers INTERFACE IMPORTED)
  set_target_properties(ferrum_moe::headers PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${ferrum_moe_INCLUDE_DIR}")
endif()
unset(_ferrum_moe_prefix)
