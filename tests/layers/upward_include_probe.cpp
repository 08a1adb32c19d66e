// Built only by the layers_upward_include test, which expects it NOT to compile: the core layer
// does not link the bus, so the bus's header is not on its include path.
#include "unimsg/bus/bus.hpp"
