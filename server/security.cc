#include "server/security.h"

#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

namespace vtw {
namespace {

// Files named on a command line are small; anything larger is not a PEM file or a token.
constexpr size_t kMaxFileBytes = 1 << 20;

std::string Named(const std::string& flag, const std::string& path) {
  return flag + " file '" + path + "'";
}

StatusOr<std::string> ReadSmallFile(const std::string& flag, const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string why = std::strerror(err);
    if (err == ENOENT) return NotFound("cannot read " + Named(flag, path) + ": " + why);
    return InvalidArgument("cannot read " + Named(flag, path) + ": " + why);
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return InvalidArgument("cannot read " + Named(flag, path) + ": not a regular file");
  }
  std::string out;
  char buf[8192];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string why = std::strerror(errno);
      close(fd);
      return InvalidArgument("cannot read " + Named(flag, path) + ": " + why);
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > kMaxFileBytes) {
      close(fd);
      return InvalidArgument(Named(flag, path) + " is larger than " +
                             std::to_string(kMaxFileBytes) + " bytes");
    }
  }
  close(fd);
  return out;
}

struct BioDeleter {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using BioPtr = std::unique_ptr<BIO, BioDeleter>;
using X509Ptr = std::unique_ptr<X509, X509Deleter>;
using KeyPtr = std::unique_ptr<EVP_PKEY, KeyDeleter>;

BioPtr MemBio(const std::string& pem) {
  return BioPtr(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
}

// Never asks for a passphrase (OpenSSL's default would prompt on the terminal).
int NoPassphrase(char*, int, int, void*) { return 0; }

// The certificates in `pem` (at least one), the first one returned.
StatusOr<X509Ptr> ParseCertificates(const std::string& flag, const std::string& path,
                                    const std::string& pem) {
  BioPtr bio = MemBio(pem);
  X509Ptr first;
  int count = 0;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, NoPassphrase, nullptr)) {
    if (count++ == 0) {
      first.reset(cert);
    } else {
      X509_free(cert);
    }
  }
  ERR_clear_error();  // the loop ends with a "no start line" error
  if (count == 0) {
    return InvalidArgument(Named(flag, path) +
                           " holds no PEM certificate ('-----BEGIN CERTIFICATE-----')");
  }
  return first;
}

StatusOr<KeyPtr> ParsePrivateKey(const std::string& flag, const std::string& path,
                                 const std::string& pem) {
  BioPtr bio = MemBio(pem);
  KeyPtr key(PEM_read_bio_PrivateKey(bio.get(), nullptr, NoPassphrase, nullptr));
  ERR_clear_error();
  if (!key) {
    return InvalidArgument(Named(flag, path) +
                           " holds no unencrypted PEM private key ('-----BEGIN PRIVATE KEY-----'; "
                           "a passphrase-protected key must be decrypted first)");
  }
  return key;
}

struct PemPair {
  std::string cert, key;
};

// Reads and cross-checks a certificate chain and its key.
StatusOr<PemPair> ReadKeyCertPair(const std::string& cert_flag, const std::string& cert_path,
                                  const std::string& key_flag, const std::string& key_path) {
  VTW_ASSIGN_OR_RETURN(std::string cert_pem, ReadSmallFile(cert_flag, cert_path));
  VTW_ASSIGN_OR_RETURN(std::string key_pem, ReadSmallFile(key_flag, key_path));
  VTW_ASSIGN_OR_RETURN(X509Ptr leaf, ParseCertificates(cert_flag, cert_path, cert_pem));
  VTW_ASSIGN_OR_RETURN(KeyPtr key, ParsePrivateKey(key_flag, key_path, key_pem));
  const int match = X509_check_private_key(leaf.get(), key.get());
  ERR_clear_error();
  if (match != 1) {
    return InvalidArgument("the private key in " + Named(key_flag, key_path) +
                           " does not belong to the first certificate in " +
                           Named(cert_flag, cert_path));
  }
  return PemPair{std::move(cert_pem), std::move(key_pem)};
}

StatusOr<std::string> ReadCaBundle(const std::string& flag, const std::string& path) {
  VTW_ASSIGN_OR_RETURN(std::string pem, ReadSmallFile(flag, path));
  VTW_RETURN_IF_ERROR(ParseCertificates(flag, path, pem).status());
  return pem;
}

std::array<uint8_t, 32> Sha256(std::string_view data) {
  std::array<uint8_t, 32> digest{};
  static_assert(SHA256_DIGEST_LENGTH == 32);
  SHA256(reinterpret_cast<const unsigned char*>(data.data()), data.size(), digest.data());
  return digest;
}

bool IsTrailingSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

}  // namespace

StatusOr<std::shared_ptr<grpc::ServerCredentials>> BuildServerCredentials(
    const ServerTlsFiles& files) {
  if (!files.enabled()) return grpc::InsecureServerCredentials();
  if (files.cert.empty() || files.key.empty()) {
    if (files.cert.empty() && files.key.empty()) {
      return InvalidArgument("--tls-client-ca needs TLS: set --tls-cert and --tls-key too");
    }
    return InvalidArgument(files.cert.empty() ? "--tls-key needs --tls-cert (both or neither)"
                                              : "--tls-cert needs --tls-key (both or neither)");
  }
  VTW_ASSIGN_OR_RETURN(PemPair pair,
                       ReadKeyCertPair("--tls-cert", files.cert, "--tls-key", files.key));
  grpc::SslServerCredentialsOptions options(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  options.pem_key_cert_pairs.push_back({std::move(pair.key), std::move(pair.cert)});
  if (!files.client_ca.empty()) {
    VTW_ASSIGN_OR_RETURN(options.pem_root_certs, ReadCaBundle("--tls-client-ca", files.client_ca));
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

StatusOr<std::shared_ptr<grpc::ChannelCredentials>> BuildChannelCredentials(
    const ClientTlsFiles& files, const std::string& flag_prefix) {
  if (!files.enabled()) return grpc::InsecureChannelCredentials();
  const std::string ca_flag = flag_prefix + "ca", cert_flag = flag_prefix + "cert",
                    key_flag = flag_prefix + "key";
  if (files.cert.empty() != files.key.empty()) {
    return InvalidArgument(files.cert.empty()
                               ? key_flag + " needs " + cert_flag + " (both or neither)"
                               : cert_flag + " needs " + key_flag + " (both or neither)");
  }
  if (files.ca.empty()) {
    return InvalidArgument(cert_flag + "/" + key_flag + " (a client certificate) need TLS: set " +
                           ca_flag + " to the CA that signed the server's certificate");
  }
  grpc::SslCredentialsOptions options;
  VTW_ASSIGN_OR_RETURN(options.pem_root_certs, ReadCaBundle(ca_flag, files.ca));
  if (!files.cert.empty()) {
    VTW_ASSIGN_OR_RETURN(PemPair pair, ReadKeyCertPair(cert_flag, files.cert, key_flag, files.key));
    options.pem_cert_chain = std::move(pair.cert);
    options.pem_private_key = std::move(pair.key);
  }
  return grpc::SslCredentials(options);
}

Status ValidateToken(const std::string& source, const std::string& token) {
  if (token.empty()) return InvalidArgument(source + " is empty: the bearer token must not be");
  for (const char c : token) {
    if (c <= 0x20 || c >= 0x7f) {
      return InvalidArgument(source +
                             ": the bearer token must be printable ASCII without spaces "
                             "(it travels in gRPC metadata as 'authorization: Bearer <token>')");
    }
  }
  return Status::Ok();
}

StatusOr<std::string> ReadTokenFile(const std::string& flag, const std::string& path) {
  VTW_ASSIGN_OR_RETURN(std::string token, ReadSmallFile(flag, path));
  while (!token.empty() && IsTrailingSpace(token.back())) token.pop_back();
  VTW_RETURN_IF_ERROR(ValidateToken(Named(flag, path), token));
  return token;
}

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  const std::array<uint8_t, 32> da = Sha256(a), db = Sha256(b);
  return CRYPTO_memcmp(da.data(), db.data(), da.size()) == 0;
}

BearerTokenAuth::BearerTokenAuth(const std::string& token) : digest_(Sha256(token)) {}

bool BearerTokenAuth::CheckHeader(std::string_view value) const {
  // Scheme "Bearer", case-insensitive (RFC 7235), then at least one space.
  constexpr std::string_view kScheme = "bearer";
  std::string_view presented;
  bool scheme_ok = value.size() > kScheme.size() && value[kScheme.size()] == ' ';
  for (size_t i = 0; scheme_ok && i < kScheme.size(); ++i) {
    scheme_ok = (value[i] | 0x20) == kScheme[i];
  }
  if (scheme_ok) {
    presented = value.substr(kScheme.size());
    while (!presented.empty() && presented.front() == ' ') presented.remove_prefix(1);
  }
  // The digest is compared even when the scheme is wrong, so that the time does not say which.
  const std::array<uint8_t, 32> d = Sha256(presented);
  const bool token_ok = CRYPTO_memcmp(d.data(), digest_.data(), d.size()) == 0;
  return scheme_ok & token_ok;
}

bool BearerTokenAuth::Check(const grpc::ServerContextBase& context) const {
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) return CheckHeader("");
  return CheckHeader(std::string_view(it->second.data(), it->second.size()));
}

}  // namespace vtw
