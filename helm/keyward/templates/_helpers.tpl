{{- define "keyward.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keyward.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "keyward.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Where the TLS files are mounted. */}}
{{- define "keyward.tlsDir" -}}/etc/keyward/tls{{- end -}}

{{/* The API port's name: https, or http with allowPlaintext. */}}
{{- define "keyward.apiPortName" -}}
{{- if .Values.tls.secretName -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/*
Refuses combinations that Keyward would refuse at start, with a message that
says what to set, so that a bad release fails at `helm install`, not in a
crash loop.
*/}}
{{- define "keyward.validate" -}}
{{- $tls := .Values.tls -}}
{{- if and $tls.secretName .Values.allowPlaintext -}}
{{- fail "keyward: set either tls.secretName (Keyward serves TLS) or allowPlaintext=true (a proxy in front terminates TLS), not both" -}}
{{- end -}}
{{- if not (or $tls.secretName .Values.allowPlaintext) -}}
{{- fail "keyward: Keyward refuses plain HTTP on a pod address. Set tls.secretName to a kubernetes.io/tls Secret (tls.crt, tls.key), or allowPlaintext=true only behind a proxy or mesh that terminates TLS" -}}
{{- end -}}
{{- if and $tls.clientCa.secretName (not $tls.secretName) -}}
{{- fail "keyward: tls.clientCa (mutual TLS) needs tls.secretName as well" -}}
{{- end -}}
{{- if and $tls.clientCrl.secretName (not $tls.clientCa.secretName) -}}
{{- fail "keyward: tls.clientCrl needs tls.clientCa.secretName: CRLs apply to client certificates" -}}
{{- end -}}
{{- $mk := .Values.masterKey -}}
{{- if not (has $mk.provider (list "env" "aws-kms" "vault" "pkcs11")) -}}
{{- fail "keyward: masterKey.provider must be env, aws-kms, vault or pkcs11" -}}
{{- end -}}
{{- if eq $mk.provider "aws-kms" -}}
{{- if not (and $mk.awsKms.keyId $mk.awsKms.region) -}}
{{- fail "keyward: masterKey.provider aws-kms needs masterKey.awsKms.keyId and masterKey.awsKms.region" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "vault" -}}
{{- if not (and $mk.vault.addr $mk.vault.transitKey) -}}
{{- fail "keyward: masterKey.provider vault needs masterKey.vault.addr and masterKey.vault.transitKey" -}}
{{- end -}}
{{- if eq (not $mk.vault.tokenSecret.name) (not (and $mk.vault.roleId $mk.vault.secretIdSecret.name)) -}}
{{- fail "keyward: masterKey.provider vault needs either masterKey.vault.tokenSecret.name, or masterKey.vault.roleId and masterKey.vault.secretIdSecret.name (AppRole)" -}}
{{- end -}}
{{- end -}}
{{- if eq $mk.provider "pkcs11" -}}
{{- if not (and $mk.pkcs11.moduleVolume $mk.pkcs11.modulePath $mk.pkcs11.keyLabel $mk.pkcs11.pinSecret.name) -}}
{{- fail "keyward: masterKey.provider pkcs11 needs masterKey.pkcs11.moduleVolume, modulePath, keyLabel and pinSecret.name" -}}
{{- end -}}
{{- if eq (not $mk.pkcs11.tokenLabel) (not $mk.pkcs11.slot) -}}
{{- fail "keyward: masterKey.provider pkcs11 needs either masterKey.pkcs11.tokenLabel or masterKey.pkcs11.slot" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where provider secrets (Vault token, AppRole secret id, Vault CA, PKCS#11 PIN) are mounted. */}}
{{- define "keyward.providerDir" -}}/etc/keyward/provider{{- end -}}

{{/* Whether the provider needs the provider-secrets volume. */}}
{{- define "keyward.providerFiles" -}}
{{- $mk := .Values.masterKey -}}
{{- if or (and (eq $mk.provider "vault") (or $mk.vault.tokenSecret.name $mk.vault.secretIdSecret.name $mk.vault.caSecret.name)) (eq $mk.provider "pkcs11") -}}true{{- end -}}
{{- end -}}
