// server/common/errno_text.h — moved to common/errno_text.h (shared by the
// client and the server). Forwards there so branches written before the
// move still build; new code includes "common/errno_text.h" and depends on
// //common:errno_text. Delete once nothing includes this path.
#ifndef BLOCKMETA_SERVER_COMMON_ERRNO_TEXT_H_
#define BLOCKMETA_SERVER_COMMON_ERRNO_TEXT_H_

#include "common/errno_text.h"  // IWYU pragma: export

#endif  // BLOCKMETA_SERVER_COMMON_ERRNO_TEXT_H_
